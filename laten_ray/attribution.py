"""Locate, part 1: how much each layer and neuron raises log P(answer's last token) (docs/method.md §1).

For a residual vector y at the last position T, log P(w | y) = log softmax(W_U (g * y) / r)[w],
with r the RMS of the last layer's output at T, frozen per example. Once r is frozen the map is
linear in y, so a neuron with output vector u_k and coefficient c_k adds (c_k / r) * P[:, k] to
the logits, where P = W_U diag(g) U ([V, n] per layer) does not depend on the example. We
compute P once per layer, in chunks, and score every example of the batch against it. A family
with a post-norm after o_proj or down_proj (Gemma 2/3, OLMo 2) has that norm's statistic frozen
the same way: u_k is the column through the norm's gain, and c_k is divided by its RMS. A
final-logit soft cap (Gemma 2) is applied to the logits inside the log-sum-exp.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .arch import Arch
from .data import Example, attribution_batch
from .hooks import capturing


@dataclass
class Scores:
    """Attribution scores summed over examples (float32, on CPU)."""
    layer_attn: torch.Tensor  # [L]
    layer_ffn: torch.Tensor   # [L]
    ffn: torch.Tensor         # [L, f]
    attn: torch.Tensor        # [L, n_heads * head_dim]  (columns of o_proj)
    n_examples: int

    def v_rows(self, n_kv_heads: int, head_dim: int) -> torch.Tensor:
        """Scores of v_proj rows: row (h_kv, i) feeds o columns (h, i) of each query head h in
        its group, so it scores the sum over the group. [L, n_kv_heads * head_dim]"""
        L, width = self.attn.shape
        n_heads = width // head_dim
        per_head = self.attn.view(L, n_kv_heads, n_heads // n_kv_heads, head_dim)
        return per_head.sum(dim=2).reshape(L, n_kv_heads * head_dim)

    def __add__(self, other: "Scores") -> "Scores":
        return Scores(self.layer_attn + other.layer_attn, self.layer_ffn + other.layer_ffn,
                      self.ffn + other.ffn, self.attn + other.attn, self.n_examples + other.n_examples)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"layer_attn": self.layer_attn, "layer_ffn": self.layer_ffn,
                "ffn": self.ffn, "attn": self.attn}


@dataclass
class Captured:
    """The residual stream at each example's last position (hooks.py names), float32.
    B examples, L layers."""
    resid_pre: torch.Tensor   # [B, L, d]  layer input
    attn_out: torch.Tensor    # [B, L, d]  attention output
    mlp_out: torch.Tensor     # [B, L, d]  MLP output
    mlp_act: torch.Tensor     # [B, L, f]  MLP activation, input of down_proj
    attn_heads: torch.Tensor  # [B, L, A]  concatenated head outputs, input of o_proj
    rms_final: torch.Tensor   # [B]        r: RMS of the last layer's output, frozen per example
    token: torch.Tensor       # [B]        w: the attributed token
    attn_rms: torch.Tensor    # [B, L]     RMS of o_proj's output where a post-norm follows it, else 1
    mlp_rms: torch.Tensor     # [B, L]     the same for down_proj

    @staticmethod
    def cat(parts: list["Captured"]) -> "Captured":
        return Captured(*(torch.cat([getattr(p, f) for p in parts]) for f in Captured.__dataclass_fields__))


@torch.inference_mode()
def capture(arch: Arch, batch: dict[str, torch.Tensor]) -> Captured:
    """One forward pass that keeps only the last real position of each row."""
    device = arch.lm_head().weight.device
    rows = torch.arange(batch["last"].shape[0], device=device)
    last = batch["last"].to(device)

    def at_last(x: torch.Tensor) -> torch.Tensor:
        return x[rows, last].float()  # [B, T, n] -> [B, n]

    with capturing(arch, at_last) as got:
        arch.model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device), logits_to_keep=1)
    eps = arch.shape.eps
    x = got.pop("resid_final")  # [B, d]
    r = torch.sqrt(x.pow(2).mean(-1) + eps)  # [B]
    stacked = {k: torch.stack(v, dim=1) for k, v in got.items()}  # each [B, L, n]
    rms = {}
    for name in ("attn", "mlp"):  # a post-norm's statistic, frozen like the final norm's
        norm_in = stacked.pop(f"{name}_norm_in", None)  # [B, L, d]
        rms[f"{name}_rms"] = (torch.sqrt(norm_in.pow(2).mean(-1) + eps) if norm_in is not None
                              else torch.ones(x.shape[0], arch.shape.n_layers, device=x.device))
    return Captured(**stacked, **rms, rms_final=r, token=batch["target"].to(device))


CPU_BLOCK_BYTES = 4 << 20  # on CPU the logits blocks stay cache-sized: bandwidth-bound otherwise


def chunk_sizes(vocab: int, batch: int, n: int, budget_bytes: int, block_bytes: int) -> tuple[int, int]:
    """Neuron chunk nc so that a projection chunk [nc, V] takes half the budget, and vocabulary
    chunk vc so that a logits block [B, nc, vc] takes at most `block_bytes` (float32)."""
    half = max(budget_bytes // 2, 1 << 20)
    nc = max(1, min(n, half // (4 * vocab)))
    vc = max(1, min(vocab, min(block_bytes, half) // (4 * batch * nc)))
    return nc, vc


def softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """c tanh(logits / c), in place, for a family's final-logit soft cap c (None: unchanged)."""
    return logits if cap is None else logits.div_(cap).tanh_().mul_(cap)


def log_prob(unembed: torch.Tensor, y: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
             cap: float | None = None) -> torch.Tensor:
    """log P(w | y) through the frozen norm (and soft cap c). unembed [V, d] = W_U * g, y [N, d],
    r [N], w [N] -> [N]"""
    logits = softcapped((y @ unembed.T) / r[:, None], cap)  # [N, V]
    return logits.gather(1, w[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


SERIES_T = 0.1  # kernel series: pairs with |alpha| x range(P_k) <= this take the cumulant series
                # (truncation error <= 0.34 t^5 / 120 < 3e-8 nats, below float32's rounding of a
                # log-sum-exp); the others the exact pass
SERIES_MIN_BATCH = 4  # below this the series' per-neuron work (powers, moments) is not repaid


def _series_scores(p: torch.Tensor, proj: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores by the cumulant series, and where it may be used. With Q = P_k - c_k (c_k its
    mid-range, so |Q| <= r_k / 2) and p = softmax(base logits), log sum_v exp(z_v + a P_kv) -
    LSE(z) = a c_k + K(a), K the cumulant generating function of Q under p:
    K(a) = k1 a + k2 a^2/2 + k3 a^3/6 + k4 a^4/24 + O((a r_k)^5), from four moment matmuls
    shared by the batch instead of B x V exponentials per neuron. The score a P_kw - (that) is
    formed without subtracting two log-sum-exps, so it loses nothing to cancellation.
    p [B, V], proj [nc, V], a [B, nc], w [B] -> (scores [B, nc], usable [B, nc])"""
    hi, lo = proj.amax(dim=-1), proj.amin(dim=-1)                 # [nc]
    c = (hi + lo) / 2
    q = proj - c[:, None]                                         # [nc, V]
    power, m = q.clone(), []
    for j in range(4):                                            # E_p[Q^1..4], each [B, nc]
        if j:
            power.mul_(q)
        m.append(p @ power.T)
    m1, m2, m3, m4 = m
    k2 = m2 - m1 * m1
    k3 = m3 - 3 * m2 * m1 + 2 * m1 ** 3
    k4 = m4 - 4 * m3 * m1 - 3 * m2 * m2 + 12 * m2 * m1 * m1 - 6 * m1 ** 4
    series = a * (proj[:, w].T - c - m1) - a ** 2 * k2 / 2 - a ** 3 * k3 / 6 - a ** 4 * k4 / 24
    return series, a.abs() * (hi - lo) <= SERIES_T


def neuron_scores(unembed: torch.Tensor, vectors: torch.Tensor, base: torch.Tensor,
                  coef: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
                  budget_bytes: int, proj_dtype: torch.dtype = torch.float32, series: bool = False,
                  cap: float | None = None) -> torch.Tensor:
    """log P(w | base + coef_k * u_k) - log P(w | base) for every neuron k, exactly (up to the
    projection's matmul, computed in `proj_dtype`: see attribution.precision). `series`: where
    |alpha| x range(P_k) <= SERIES_T the cumulant series (_series_scores), exact to below float32
    rounding, and the exact pass for the other (example, neuron) pairs only (for SERIES_MIN_BATCH
    examples or more; fewer take the exact pass throughout). A soft cap c (Gemma 2) makes the
    logits c tanh((z + alpha P_k) / c), not linear in alpha: the exact pass only.

    unembed [V, d], vectors [d, n] (u_k = column k), base [B, d], coef [B, n], r [B], w [B] -> [B, n]
    """
    V = unembed.shape[0]
    B, n = coef.shape
    series = series and B >= SERIES_MIN_BATCH and cap is None
    base_logits = (base @ unembed.T) / r[:, None]                  # [B, V]: before the cap
    capped = softcapped(base_logits.clone(), cap) if cap is not None else base_logits  # [B, V]
    base_lse = torch.logsumexp(capped, dim=-1, keepdim=True)       # [B, 1]
    alpha = coef / r[:, None]                                      # [B, n]
    out = torch.empty(B, n, dtype=torch.float32, device=base.device)
    low = unembed.to(proj_dtype) if proj_dtype != torch.float32 else unembed  # [V, d]
    block_bytes = budget_bytes if base.is_cuda else CPU_BLOCK_BYTES
    nc, vc = chunk_sizes(V, B, n, budget_bytes // (3 if series else 1), block_bytes)  # series: 2 more [nc, V]
    p = torch.softmax(base_logits, dim=-1) if series else None    # [B, V]
    for n0 in range(0, n, nc):
        proj = (vectors[:, n0:n0 + nc].T.to(low.dtype) @ low.T).float()  # [nc, V]: P^T for this chunk
        if series:
            got, usable = _series_scores(p, proj, alpha[:, n0:n0 + nc], w)
            out[:, n0:n0 + nc] = got
            rest = (~usable).nonzero()                             # [M, 2]: (example, neuron) pairs
            for i in range(0, rest.shape[0], max(1, (block_bytes // 4) // V)):
                b, k = rest[i:i + (block_bytes // 4) // V].T       # the exact pass, pair by pair
                x = torch.addcmul(base_logits[b], alpha[b, n0 + k, None], proj[k])  # [m, V]
                lse = torch.logsumexp(x, dim=-1)
                out[b, n0 + k] = alpha[b, n0 + k] * proj[k, w[b]] - (lse - base_lse[b, 0])
            continue
        a = alpha[:, n0:n0 + nc, None]                             # [B, nc, 1]
        lse = torch.full(a.shape[:2], float("-inf"), device=base.device)  # [B, nc]
        for v0 in range(0, V, vc):
            block = softcapped(torch.addcmul(base_logits[:, None, v0:v0 + vc], a, proj[None, :, v0:v0 + vc]), cap)
            top = block.amax(dim=-1, keepdim=True)                 # [B, nc, 1]
            part = block.sub_(top).exp_().sum(dim=-1).log_().add_(top[..., 0])  # in place: no copies
            lse = torch.logaddexp(lse, part)                       # block [B, nc, vc]
        gain = a[..., 0] * proj[:, w].T                            # [B, nc]: alpha * P[w, k]
        if cap is not None:                                        # the capped logit of w, new - old
            z_w = base_logits.gather(1, w[:, None])                # [B, 1]
            gain = softcapped(z_w + gain, cap) - capped.gather(1, w[:, None])
        out[:, n0:n0 + nc] = gain - (lse - base_lse)
    return out


def score_each(arch: Arch, cap: Captured, budget_bytes: int, proj_dtype: torch.dtype = torch.float32,
               series: bool = False) -> list[Scores]:
    """Scores of each captured example, one layer at a time; every per-layer projection is
    computed once and shared by all B examples."""
    s, softcap = arch.shape, arch.shape.logit_softcap
    head, gain = arch.lm_head().weight, arch.norm_gain(arch.final_norm())
    unembed = head.to(torch.float32, copy=True).mul_(gain)  # [V, d]: W_U diag(g), one copy
    layer_attn, layer_ffn, ffn, attn = [], [], [], []
    for i in range(s.n_layers):
        h_in, a, m = cap.resid_pre[:, i], cap.attn_out[:, i], cap.mlp_out[:, i]  # each [B, d]
        h_mid = h_in + a
        B = h_in.shape[0]
        r, w = cap.rms_final, cap.token
        lp = log_prob(unembed, torch.cat([h_in, h_mid, h_mid + m]), r.repeat(3), w.repeat(3), softcap)
        lp_in, lp_mid, lp_out = lp.view(3, B)
        layer_attn.append(lp_mid - lp_in)  # [B]
        layer_ffn.append(lp_out - lp_mid)  # [B]
        w_down = arch.out_vectors(i, "down")  # [d, f]: through a post-norm's gain where there is one
        w_o = arch.out_vectors(i, "o")        # [d, A]
        c_ffn = cap.mlp_act[:, i] / cap.mlp_rms[:, i, None]      # [B, f]: / a post-norm's RMS (else 1)
        c_attn = cap.attn_heads[:, i] / cap.attn_rms[:, i, None]  # [B, A]
        ffn.append(neuron_scores(unembed, w_down, h_mid, c_ffn, r, w, budget_bytes, proj_dtype, series, softcap))
        attn.append(neuron_scores(unembed, w_o, h_in, c_attn, r, w, budget_bytes, proj_dtype, series, softcap))
    stacked = [torch.stack(t, dim=1).cpu() for t in (layer_attn, layer_ffn, ffn, attn)]  # [B, L, ...]
    return [Scores(*(t[b] for t in stacked), n_examples=1) for b in range(cap.token.shape[0])]


def score_captured(arch: Arch, cap: Captured, budget_bytes: int) -> Scores:
    """Scores summed over the captured examples."""
    each = score_each(arch, cap, budget_bytes)
    return sum(each[1:], each[0])


PRECISIONS = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def matmul_precision(precision: str):
    """float32 matmuls as `attribution.precision` says, inside this block only: "float32" exact
    (even where the process has turned TF32 on), "tf32" TF32 tensor cores on NVIDIA GPUs (float32
    elsewhere), "bfloat16" as float32 here (its projections are cast instead, score_each). The
    global settings are put back after, so training and the caller's code never see them."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def attribute_each(arch: Arch, tokenizer, examples: list[Example], batch_size: int = 8,
                   budget_bytes: int = 256 << 20, group: int = 64, precision: str = "float32",
                   kernel: str = "series") -> list[Scores]:
    """Scores of each example. Forward passes go `batch_size` examples at a time; each per-layer
    projection is computed once per `group` examples and shared by all of them. `kernel`:
    attribution.kernel, series (the cumulant series where it holds, neuron_scores) or exact."""
    out = []
    with matmul_precision(precision):
        for g0 in range(0, len(examples), group):
            chunk = examples[g0:g0 + group]
            parts = [capture(arch, attribution_batch(tokenizer, chunk[i:i + batch_size]))
                     for i in range(0, len(chunk), batch_size)]
            with torch.inference_mode():
                out += score_each(arch, Captured.cat(parts), budget_bytes, PRECISIONS[precision], kernel == "series")
    return out


def attribute(arch: Arch, tokenizer, examples: list[Example], batch_size: int = 8,
              budget_bytes: int = 256 << 20, group: int = 64) -> Scores:
    """Scores of `examples`, summed (see attribute_each)."""
    each = attribute_each(arch, tokenizer, examples, batch_size, budget_bytes, group)
    return sum(each[1:], each[0])
