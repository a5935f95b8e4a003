"""Forward hooks in a with-block that always removes them, and the named points of a decoder
where attribution reads the residual stream. Models are never forked: every read (attribution,
the reference) and every edit (injection) goes through `Hooks`.

Capture points, per layer unless said otherwise (docs/method.md §1):
  resid_pre    the layer's input (residual stream before the layer)          [.., d]
  attn_heads   the concatenated head outputs, input of o_proj                [.., n_heads * head_dim]
  attn_out     what attention adds to the residual stream: o_proj's output,  [.., d]
               or the attention post-norm's where the family has one
  attn_norm_in o_proj's output where a post-norm follows it (else not kept)  [.., d]
  mlp_act      act(gate(x)) * up(x), input of down_proj                      [.., f]
  mlp_out      what the MLP adds: down_proj's output, or its post-norm's     [.., d]
  mlp_norm_in  down_proj's output where a post-norm follows it               [.., d]
  resid_final  the input of the final norm (one per model, not per layer)    [.., d]
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .arch import Arch

POINTS = ("resid_pre", "attn_heads", "attn_out", "attn_norm_in", "mlp_act", "mlp_out", "mlp_norm_in", "resid_final")


class Hooks:
    """Register hooks inside `with Hooks() as h:`; all of them are removed when the block ends,
    however it ends."""

    def __init__(self):
        self._handles: list = []

    def on_input(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        """fn(the module's first input), before the module runs."""
        def hook(mod, args, kwargs):
            fn(args[0] if args else kwargs["hidden_states"])
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def on_output(self, module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]) -> None:
        """fn(first input, output) after the module runs; a tensor it returns replaces the output."""
        self._handles.append(module.register_forward_hook(lambda mod, args, out: fn(args[0], out)))

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextmanager
def capturing(arch: Arch, pick: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[dict]:
    """Within the block, each forward pass stores `pick(tensor)` at every capture point:
    got[point][layer] for the per-layer points, got["resid_final"] once; the *_norm_in points
    only for a family with post-norms."""
    L, family = arch.shape.n_layers, arch.family
    blocks = (("o", "attn_heads", "attn_out", "attn_norm_in"), ("down", "mlp_act", "mlp_out", "mlp_norm_in"))
    unused = {norm_in for module, _, _, norm_in in blocks if family.post_norm(module) is None}
    got: dict = {p: [None] * L for p in POINTS if p != "resid_final" and p not in unused}

    def store(point: str, layer: int | None = None):
        def keep(x: torch.Tensor) -> None:
            if layer is None:
                got[point] = pick(x)
            else:
                got[point][layer] = pick(x)
        return keep

    def store_both(inp: str, out: str, layer: int):
        def keep(x: torch.Tensor, y: torch.Tensor) -> None:
            got[inp][layer], got[out][layer] = pick(x), pick(y)
        return keep

    with Hooks() as hooks:
        hooks.on_input(arch.final_norm(), store("resid_final"))
        for i in range(L):
            hooks.on_input(arch.layers[i], store("resid_pre", i))
            for module, act, out, norm_in in blocks:
                post = family.post_norm(module)
                if post is None:
                    hooks.on_output(arch.part(i, module), store_both(act, out, i))
                else:  # the projection's input and output, then what its post-norm makes of it
                    hooks.on_output(arch.part(i, module), store_both(act, norm_in, i))
                    hooks.on_output(arch.part(i, post), lambda _x, y, keep=store(out, i): keep(y))
        yield got
