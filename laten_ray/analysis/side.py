"""One model of the pair as the analysis sees it, in this process or inside a Ray actor
(actors/analyzer.py): only Grams, scores and small summaries leave it, never activations."""
from __future__ import annotations

import hashlib

import torch

from ..arch import MODULES, Arch
from ..attribution import attribute_each
from ..data import Example, lm_batch
from ..hooks import Hooks
from ..models import load_model, load_tokenizer, pick_device, resolve
from . import neurons, parametric
from .cka import pieces, u_center


class Side:
    def __init__(self, spec: str, dtype: str = "float32", device: str = "auto", model=None, tokenizer=None):
        self.spec = spec
        self.tokenizer = tokenizer or load_tokenizer(spec)
        self.model = model or load_model(spec, dtype, pick_device(device))
        self.arch = Arch(self.model)
        self.shape = self.arch.shape

    @torch.inference_mode()
    def grams(self, examples: list[Example], max_length: int, gram_tokens: int, modules=MODULES) -> dict:
        """One forward pass over `examples` (prompt + answer as training builds it, data.lm_batch).
        Each module's output at the answer tokens (labels != -100), [n, width] for one layer at a
        time inside its hook, is cut into pieces (cka.pieces) and kept only as U-centred Grams:
        {"grams": {module: [[L, b, b] per piece]}, "tokens": digest of the answer token ids}."""
        batch = lm_batch(self.tokenizer, examples, max_length)
        device = self.arch.lm_head().weight.device
        mask = (batch["labels"] != -100).to(device)          # [B, T]
        sizes = pieces(int(mask.sum()), gram_tokens)
        L = self.shape.n_layers
        grams = {m: [torch.empty(L, b, b, dtype=torch.float64) for b in sizes] for m in modules}

        def keep(module: str, layer: int):
            def fn(_inp: torch.Tensor, out: torch.Tensor) -> None:
                x = self.arch.output(module, out)[mask].float()  # [n, width]: this layer's only copy
                for p, xp in enumerate(x.split(sizes)):
                    grams[module][p][layer] = u_center(xp @ xp.T).cpu()  # [b, b]
            return fn

        if sizes:
            with Hooks() as hooks:
                for i in range(L):
                    for m in modules:
                        hooks.on_output(self.arch.part(i, m), keep(m, i))
                self.model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), logits_to_keep=1)
        ids = batch["labels"][batch["labels"] != -100]
        return {"grams": grams, "tokens": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "n": len(ids)}

    def neurons(self, examples: list[Example], counts: dict[str, int], batch_size: int, chunk_mb: int) -> dict:
        """Attribution of each example (docs/method.md §1): the per-example layer scores [N, L]
        (for layer alignment) and the Jaccard stability of the top-K neurons per layer."""
        each = attribute_each(self.arch, self.tokenizer, examples, batch_size, chunk_mb << 20)
        return {"layer_ffn": torch.stack([s.layer_ffn for s in each]),    # [N, L]
                "layer_attn": torch.stack([s.layer_attn for s in each]),  # [N, L]
                "jaccard": neurons.stability(each, self.shape, counts)}

    def deltas(self, folder: str) -> dict:
        """Cosines of the weight deltas of a fine-tuned or merged copy of this model (parametric.py)."""
        return parametric.compare(resolve(self.spec), folder)
