"""Plain, slow definitions that the fast paths are checked against (tests and benchmarks).

`attribute_per_neuron` follows docs/method.md §1 literally: one example at a time, each component
added to the residual vector and projected through the whole unembedding.
"""
from __future__ import annotations

import torch

from .arch import Arch
from .attribution import Scores
from .data import Example, attribution_ids
from .hooks import capturing


@torch.inference_mode()
def _trace(arch: Arch, ids: list[int]) -> dict:
    """The capture points (hooks.py) at the last position of one unbatched, unpadded sequence."""
    with capturing(arch, lambda x: x[0, -1].float()) as got:
        arch.model(input_ids=torch.tensor([ids], device=arch.lm_head().weight.device))
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
        r = torch.sqrt(got["resid_final"].pow(2).mean() + s.eps)

        def log_p(y: torch.Tensor) -> float:
            return torch.log_softmax(head @ (g * y / r), dim=-1)[w].item()

        for i in range(s.n_layers):
            h_in = got["resid_pre"][i]
            h_mid = h_in + got["attn_out"][i]
            c, z = got["mlp_act"][i], got["attn_heads"][i]
            m = arch.part(i, "down")(c.to(arch.weight(i, "down").dtype)).float()  # recomputed, not read
            base_in, base_mid = log_p(h_in), log_p(h_mid)
            layer_attn[i] += base_mid - base_in
            layer_ffn[i] += log_p(h_mid + m) - base_mid
            w_down, w_o = arch.weight(i, "down").float(), arch.weight(i, "o").float()
            for k in range(s.ffn):
                ffn[i, k] += log_p(h_mid + c[k] * w_down[:, k]) - base_mid
            for j in range(s.attn_width):
                attn[i, j] += log_p(h_in + z[j] * w_o[:, j]) - base_in
    return Scores(layer_attn, layer_ffn, ffn, attn, len(examples))
