"""Locate, part 2: layer alignment, top-K neurons, and the source's knowledge slices (DESIGN.md §2-3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .arch import Arch, Shape
from .attribution import Scores

FFN_MODULES = ("up", "down")  # one FFN neuron k = row k of up_proj + column k of down_proj


def neuron_counts(target: Shape, rate: float, modules) -> dict[str, int]:
    """K per module type, from the target's sizes: K = rate * (target's neurons of that type)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    return {m: max(1, round(rate * target.neurons(m))) for m in modules}


def module_scores(scores: Scores, shape: Shape, module: str) -> torch.Tensor:
    """Per-neuron scores of one module type. [L, n]"""
    if module in FFN_MODULES:
        return scores.ffn
    if module == "o":
        return scores.attn
    return scores.v_rows(shape.n_kv_heads, shape.head_dim)


def align_layers(layer_scores: torch.Tensor, n_target_layers: int) -> torch.Tensor:
    """The top-L_t source layers by score, sorted by depth: entry i feeds target layer i. [L_t]"""
    if layer_scores.numel() < n_target_layers:
        raise ValueError(f"source has {layer_scores.numel()} layers, fewer than the target's "
                         f"{n_target_layers}")
    return layer_scores.topk(n_target_layers).indices.sort().values


def top_neurons(per_neuron: torch.Tensor, k: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, best first (rank r of the source meets rank r of the target). [L, k] each"""
    if k > per_neuron.shape[-1]:
        raise ValueError(f"{what}: K={k} neurons asked for but only {per_neuron.shape[-1]} exist; "
                         "lower the rate")
    top = per_neuron.topk(k, dim=-1)
    return top.indices, top.values


@dataclass
class Located:
    """One model's selection. For the source, `slices` holds the selected neuron vectors."""
    layers: dict[str, torch.Tensor]  # module -> [L_t] layer of this model feeding target layer i
    index: dict[str, torch.Tensor]   # module -> [L_t, K] neuron indices, best first
    score: dict[str, torch.Tensor]   # module -> [L_t, K]
    slices: dict[str, torch.Tensor] | None = None  # module -> [L_t, K, d_s]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slices or {}).values())


def locate_source(arch: Arch, scores: Scores, target: Shape, counts: dict[str, int]) -> Located:
    """Align source layers to the target's, pick top-K neurons there and extract their vectors."""
    shape = arch.shape
    by_kind = {"ffn": align_layers(scores.layer_ffn, target.n_layers),
               "attn": align_layers(scores.layer_attn, target.n_layers)}
    layers, index, score, slices = {}, {}, {}, {}
    for module, k in counts.items():
        chosen = by_kind["ffn" if module in FFN_MODULES else "attn"]  # [L_t]
        idx, val = top_neurons(module_scores(scores, shape, module)[chosen], k, f"source {module}")
        layers[module], index[module], score[module] = chosen, idx, val
        slices[module] = torch.stack([arch.neuron_vectors(int(l), module, idx[i])
                                      for i, l in enumerate(chosen.tolist())])  # [L_t, K, d_s]
    return Located(layers, index, score, slices)


def locate_target(scores: Scores, shape: Shape, counts: dict[str, int]) -> Located:
    """The target's own top-K neurons in every layer (no alignment: layer i is layer i)."""
    all_layers = torch.arange(shape.n_layers)
    layers, index, score = {}, {}, {}
    for module, k in counts.items():
        idx, val = top_neurons(module_scores(scores, shape, module), k, f"target {module}")
        layers[module], index[module], score[module] = all_layers, idx, val
    return Located(layers, index, score)
