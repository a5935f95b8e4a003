"""Plain, slow definitions that the fast paths are checked against (tests and benchmarks).

`attribute_per_neuron` follows DESIGN.md §1 literally: one example at a time, each component
added to the residual vector and projected through the whole unembedding.
"""
from __future__ import annotations

import torch

from .arch import Arch
from .attribution import Scores
from .data import Example, attribution_ids


@torch.inference_mode()
def _trace(arch: Arch, ids: list[int]) -> dict:
    """Per layer: layer input, attention output, o_proj input, down_proj input; and the final x."""
    got: dict = {"h": {}, "a": {}, "z": {}, "c": {}}
    handles = [arch.final_norm().register_forward_pre_hook(
        lambda mod, args: got.__setitem__("final", args[0][0, -1].float()))]
    for i in range(arch.shape.n_layers):
        def pre(mod, args, kwargs, i=i):
            got["h"][i] = (args[0] if args else kwargs["hidden_states"])[0, -1].float()

        def o_hook(mod, args, out, i=i):
            got["z"][i], got["a"][i] = args[0][0, -1].float(), out[0, -1].float()

        def down_hook(mod, args, out, i=i):
            got["c"][i] = args[0][0, -1].float()
        handles += [arch.layers[i].register_forward_pre_hook(pre, with_kwargs=True),
                    arch.part(i, "o").register_forward_hook(o_hook),
                    arch.part(i, "down").register_forward_hook(down_hook)]
    try:
        device = arch.lm_head().weight.device
        arch.model(input_ids=torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    return got


@torch.inference_mode()
def attribute_per_neuron(arch: Arch, tokenizer, examples: list[Example]) -> Scores:
    s = arch.shape
    head = arch.lm_head().weight.float()  # [V, d]
    g = arch.final_norm().weight.float()  # [d]
    layer_attn, layer_ffn = torch.zeros(s.n_layers), torch.zeros(s.n_layers)
    ffn, attn = torch.zeros(s.n_layers, s.ffn), torch.zeros(s.n_layers, s.attn_width)
    for example in examples:
        ids, w = attribution_ids(tokenizer, example)
        got = _trace(arch, ids)
        r = torch.sqrt(got["final"].pow(2).mean() + s.eps)

        def log_p(y: torch.Tensor) -> float:
            return torch.log_softmax(head @ (g * y / r), dim=-1)[w].item()

        for i in range(s.n_layers):
            h_in = got["h"][i]
            h_mid = h_in + got["a"][i]
            m = arch.part(i, "down")(got["c"][i].to(arch.weight(i, "down").dtype)).float()
            base_in, base_mid = log_p(h_in), log_p(h_mid)
            layer_attn[i] += base_mid - base_in
            layer_ffn[i] += log_p(h_mid + m) - base_mid
            w_down, w_o = arch.weight(i, "down").float(), arch.weight(i, "o").float()
            for k in range(s.ffn):
                ffn[i, k] += log_p(h_mid + got["c"][i][k] * w_down[:, k]) - base_mid
            for j in range(s.attn_width):
                attn[i, j] += log_p(h_in + got["z"][i][j] * w_o[:, j]) - base_in
    return Scores(layer_attn, layer_ffn, ffn, attn, len(examples))
