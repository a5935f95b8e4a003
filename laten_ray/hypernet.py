"""Align (docs/method.md §4): one small MLP per module type maps source neuron vectors (d_s) to the target's width (d_t)."""
from __future__ import annotations

import torch
from torch import nn


class HyperNet(nn.Module):
    """Linear(d_s, hidden) -> ReLU -> Linear(hidden, d_t), no bias, one per module type.

    The first layer keeps PyTorch's default init; the last starts near zero (std `init_std`),
    so the first deltas barely move the target and the regularizer starts near zero.
    """

    def __init__(self, d_source: int, d_target: int, modules, hidden: int | None = None,
                 init_std: float = 1e-4):
        super().__init__()
        hidden = hidden or d_source
        self.mlps = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(d_source, hidden, bias=False), nn.ReLU(),
                             nn.Linear(hidden, d_target, bias=False))
            for m in modules})
        for mlp in self.mlps.values():
            nn.init.normal_(mlp[2].weight, std=init_std)

    def forward(self, slices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{module: [L, K, d_s]} -> {module: [L, K, d_t]} in float32."""
        p = next(self.parameters())
        return {m: self.mlps[m](s.to(device=p.device, dtype=p.dtype)) for m, s in slices.items()}
