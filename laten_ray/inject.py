"""Inject: add translated vectors at the target's top-K rows/columns (docs/method.md §5).

During training the deltas are live tensors and the edit is applied by forward hooks that touch
only the K selected rows/columns, so no full-size delta matrix ever exists. `merge_into` makes
the same edit for real in the weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .arch import NEURON_AXIS, Arch
from .hooks import Hooks


def _row_edit(index: torch.Tensor, delta: torch.Tensor):
    """up/v: rows idx of W gain delta, so output features idx gain x @ delta^T (idx counts the
    fused weight's rows where the module is a range of one)."""
    def edit(x, output):                                         # x [B, T, d]
        return output.index_add(-1, index, x @ delta.to(x.dtype).T)  # [B, T, K] into [B, T, n]
    return edit


def _column_edit(index: torch.Tensor, delta: torch.Tensor):
    """down/o: columns idx of W gain delta^T, so the output gains x[..., idx] @ delta."""
    def edit(x, output):                                         # x [B, T, n]
        return output + x.index_select(-1, index) @ delta.to(x.dtype)  # [B, T, K] @ [K, d]
    return edit


@contextmanager
def injected(arch: Arch, index: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]):
    """Within the block, the target computes as if W[idx] += delta (rows) or W[:, idx] += delta^T
    (columns) in every layer. index: module -> [L, K]; delta: module -> [L, K, d_t]."""
    with Hooks() as hooks:
        for module, d in delta.items():
            make = _row_edit if NEURON_AXIS[module] == 0 else _column_edit
            for layer in range(d.shape[0]):
                part = arch.part(layer, module)
                idx = index[module][layer].to(part.weight.device)
                if make is _row_edit:  # the module's rows may start further down a fused weight
                    idx = idx + arch.rows(module).start
                hooks.on_output(part, make(idx, d[layer].to(part.weight.device)))
        yield


@torch.no_grad()
def merge_into(arch: Arch, index: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, float]:
    """Add the deltas into the weights for real (in float32, then back to the weight's dtype).
    Returns the share of each module's delta that survived the rounding to the weight's dtype,
    and of all together ("all"): <saved - original, delta> / |delta|^2, over the edited rows or
    columns in float32. 1.0 when the weights hold it (float32), near 0 when it rounds away."""
    along, norm = {}, {}
    for module, d in delta.items():
        axis = NEURON_AXIS[module]
        along[module] = norm[module] = 0.0
        for layer in range(d.shape[0]):
            w = arch.weight(layer, module)
            idx = index[module][layer].to(w.device)
            rows = d[layer].to(device=w.device, dtype=torch.float32)  # [K, d_t]
            rows = rows if axis == 0 else rows.T
            before = w.index_select(axis, idx).float()
            edited = (before + rows).to(w.dtype)
            w.index_copy_(axis, idx, edited)
            along[module] += float(((edited.float() - before) * rows).sum())
            norm[module] += float(rows.pow(2).sum())
    share = {m: along[m] / norm[m] if norm[m] else 1.0 for m in delta}
    total = sum(norm.values())
    share["all"] = sum(along.values()) / total if total else 1.0
    return share
