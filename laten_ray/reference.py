"""Plain, slow definitions that the fast paths are checked against (tests and benchmarks).

`attribute_per_neuron` follows docs/method.md §1 literally: one example at a time, each component
added to the residual vector and projected through the whole unembedding. It takes what it can
from the model's own modules rather than from the family's entry in families.yaml, so a wrong
entry shows up as a difference: a norm's gain is measured by running the norm module, a
post-norm's output is recomputed by running the projection and the norm, and the soft cap is
read from the config by its HF name.
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


def measured_gain(norm: torch.nn.Module, d: int) -> torch.Tensor:
    """What an RMSNorm module multiplies x / rms(x) by, measured: norm(x) for x = 1000 * ones,
    whose rms is 1000 (eps changes it by < 1e-12). [d] float32"""
    w = norm.weight
    return norm(torch.full((d,), 1000.0, dtype=w.dtype, device=w.device)).float()


@torch.inference_mode()
def attribute_per_neuron(arch: Arch, tokenizer, examples: list[Example]) -> Scores:
    s, model = arch.shape, arch.model
    head = arch.lm_head().weight.float()  # [V, d]
    g = measured_gain(arch.final_norm(), s.hidden)  # [d]
    cap = getattr(model.config, "final_logit_softcapping", None)
    layer_attn, layer_ffn = torch.zeros(s.n_layers), torch.zeros(s.n_layers)
    ffn, attn = torch.zeros(s.n_layers, s.ffn), torch.zeros(s.n_layers, s.attn_width)
    for example in examples:
        ids, w = attribution_ids(tokenizer, example)
        got = _trace(arch, ids)
        r = torch.sqrt(got["resid_final"].pow(2).mean() + s.eps)

        def log_p(y: torch.Tensor) -> float:
            logits = head @ (g * y / r)
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            return torch.log_softmax(logits, dim=-1)[w].item()

        def block(i: int, module: str, act: torch.Tensor):
            """The block's output, recomputed from the projection's input through the modules,
            and the map from one neuron's raw vector to what it adds with the post-norm's RMS
            frozen at the whole output's."""
            proj = arch.part(i, module)
            raw = proj(act.to(proj.weight.dtype)).float()  # [d]
            post = arch.family.post_norm(module)
            if post is None:
                return raw, lambda v: v
            norm = arch.part(i, post)
            rms = torch.sqrt(raw.pow(2).mean() + s.eps)
            gain = measured_gain(norm, s.hidden)
            return norm(raw.to(proj.weight.dtype)).float(), lambda v: gain * v / rms

        for i in range(s.n_layers):
            h_in = got["resid_pre"][i]
            c, z = got["mlp_act"][i], got["attn_heads"][i]
            a, through_o = block(i, "o", z)
            m, through_down = block(i, "down", c)
            h_mid = h_in + a
            base_in, base_mid = log_p(h_in), log_p(h_mid)
            layer_attn[i] += base_mid - base_in
            layer_ffn[i] += log_p(h_mid + m) - base_mid
            w_down, w_o = arch.weight(i, "down").float(), arch.weight(i, "o").float()
            for k in range(s.ffn):
                ffn[i, k] += log_p(h_mid + through_down(c[k] * w_down[:, k])) - base_mid
            for j in range(s.attn_width):
                attn[i, j] += log_p(h_in + through_o(z[j] * w_o[:, j])) - base_in
    return Scores(layer_attn, layer_ffn, ffn, attn, len(examples))
