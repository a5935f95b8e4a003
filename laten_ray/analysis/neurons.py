"""Neuron overlap (docs/method.md §11): how stable the top-K neurons are from one example to the
next, and where a LaTen merge puts its delta norm."""
from __future__ import annotations

import torch

from ..arch import Shape
from ..attribution import Scores
from ..locate import module_scores, top_neurons

# up_proj rows and down_proj columns share the FFN selection (docs/method.md §3): one entry.
KINDS = {"ffn": "up", "v": "v", "o": "o"}


def mean_jaccard(masks: torch.Tensor) -> float | None:
    """Mean Jaccard index over all pairs of rows of a [N, n] boolean mask (the per-example top-K
    sets, each of the same size); None for fewer than 2 examples."""
    N = masks.shape[0]
    if N < 2:
        return None
    m = masks.double()
    inter = m @ m.T                                             # [N, N]
    size = m.sum(1)
    union = size[:, None] + size[None, :] - inter
    pairs = torch.triu_indices(N, N, offset=1)
    return float((inter / union)[pairs[0], pairs[1]].mean())


def chance(k: int, n: int) -> float:
    """About the Jaccard index of two independent uniform K-subsets of n: E|A n B| = K^2/n,
    so J ~ (K^2/n) / (2K - K^2/n) = K / (2n - K)."""
    return k / (2 * n - k)


def stability(each: list[Scores], shape: Shape, counts: dict[str, int]) -> dict[str, list]:
    """{kind: [mean pairwise Jaccard of the examples' top-K sets] per layer}, K = counts[module]
    (LaTen's K, from the target's sizes)."""
    out = {}
    for kind, module in KINDS.items():
        if module not in counts:
            continue
        per = torch.stack([module_scores(s, shape, module) for s in each])   # [N, L, n]
        idx, _ = top_neurons(per, counts[module], f"{kind} neurons")          # [N, L, K]
        masks = torch.zeros_like(per, dtype=torch.bool).scatter_(-1, idx, True)
        out[kind] = [mean_jaccard(masks[:, layer]) for layer in range(shape.n_layers)]
    return out


def delta_shares(merge_report: dict) -> dict[str, list[float]]:
    """From a laten_merge.json: {module: share of the squared delta norm in each target layer},
    each list summing to 1 (all zeros when every delta is zero)."""
    out = {}
    for module, entry in merge_report["modules"].items():
        sq = torch.tensor([layer["delta_norm"] for layer in entry["layers"]], dtype=torch.float64).pow(2)
        total = float(sq.sum())
        out[module] = (sq / total if total > 0 else sq).tolist()
    return out
