"""How the next token is chosen: the sampling settings (vLLM's and the OpenAI API's meaning) and
the transformers engine's implementation of them. vLLM's is in vllm.py (vllm_sampling)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# Temperatures below this sample as greedy (vLLM's own threshold): dividing logits by 1e-300
# overflows to inf and nan.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(1 << 63), 1 << 64)  # what a seed may be: vLLM's 64-bit seeds, either sign


@dataclass
class Sampling:
    """How tokens are chosen; the same meaning (vLLM's, the OpenAI API's) in both engines. A
    value out of its range is a ValueError naming the field, whoever builds it (evaluation
    settings from YAML, the server's requests, the study)."""
    max_tokens: int = 512      # 0 only for the server's echo (prompt log-probs, nothing generated)
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
    logprobs: int | None = None  # each generated token's log-prob and this many top ones

    def __post_init__(self) -> None:
        def need(name: str, ok: bool, what: str) -> None:
            if not ok:
                value = repr(getattr(self, name))
                raise ValueError(f"sampling: {name!r} must be {what}, got {value[:80]}")
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        number = lambda v: (integer(v) or isinstance(v, float)) and math.isfinite(v)  # noqa: E731
        need("max_tokens", integer(self.max_tokens) and self.max_tokens >= 0, "an integer >= 0")
        need("temperature", number(self.temperature) and self.temperature >= 0, "a number >= 0")
        need("top_p", number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")
        need("n", integer(self.n) and self.n >= 1, "an integer >= 1")
        need("stop", isinstance(self.stop, list) and all(isinstance(s, str) for s in self.stop), "a list of strings")
        need("seed", self.seed is None or (integer(self.seed) and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]),
             "null or an integer of at most 64 bits")
        need("ignore_eos", isinstance(self.ignore_eos, bool), "a boolean")
        need("top_k", integer(self.top_k) and self.top_k >= -1, "-1, 0 (all tokens) or a positive integer")
        need("min_p", number(self.min_p) and 0 <= self.min_p <= 1, "a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            need(name, number(getattr(self, name)) and -2 <= getattr(self, name) <= 2, "a number in [-2, 2]")
        need("repetition_penalty", number(self.repetition_penalty) and self.repetition_penalty > 0, "a number > 0")
        need("logit_bias", isinstance(self.logit_bias, dict) and all(
            integer(k) and k >= 0 and number(v) for k, v in self.logit_bias.items()),
            "a mapping of token ids to finite numbers")
        need("logprobs", self.logprobs is None or (integer(self.logprobs) and self.logprobs >= 0),
             "null or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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
    if s.greedy:
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


Entry = tuple[int, float | None, list[tuple[int, float]]]  # a token, its log-probability (None: a prompt's
                                                           # first token), the top (token, log-prob)s


def entry(logp: torch.Tensor, token: int, top: int) -> Entry:
    """One position's log-probabilities [V] (the model's own distribution, before sampling
    controls, as vLLM's default raw log-probs) as an Entry with the `top` likeliest."""
    values, ids = logp.topk(top) if top else (logp[:0], logp[:0].long())
    return token, float(logp[token]), list(zip(ids.tolist(), values.tolist()))
