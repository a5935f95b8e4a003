"""attribution.precision side by side: the same random model and examples attributed at float32,
tf32 and bfloat16; time per layer and, against float32, the largest relative score error and the
overlap (Jaccard) of the top-K neurons per layer.

    python bench/precision.py                 # CPU: the paper code's anchor shape, 2 layers, 1 thread
    python bench/precision.py --preset gpu-7b # a GPU: a Llama-2-7B-sized layer (d 4096, f 11008)

On a CPU tf32 is float32 (no TF32 there); bfloat16 casts the per-layer projections.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import random_llama  # bench/common.py
from laten_ray.arch import Arch
from laten_ray.attribution import attribute_each
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.data import read_examples

PRESETS = {  # vocab, hidden, ffn, layers, heads, device, dtype of the weights
    "cpu": (32000, 512, 1376, 2, 8, "cpu", torch.float32),
    "gpu-7b": (32000, 4096, 11008, 2, 32, "cuda", torch.bfloat16),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--rate", type=float, default=0.1, help="K = rate x neurons, as transfer.rate")
    args = p.parse_args()
    vocab, hidden, ffn, layers, heads, device, dtype = PRESETS[args.preset]
    torch.set_num_threads(1)
    model = random_llama(vocab, hidden, ffn, layers, heads, dtype=dtype, device=device)
    arch, tokenizer = Arch(model), build_tokenizer()
    examples = read_examples("demo:extract", limit=args.examples)
    k = max(1, round(args.rate * ffn))
    attribute_each(arch, tokenizer, examples[:1])  # warm-up: kernels, allocator
    results = {}
    for precision in ("float32", "tf32", "bfloat16"):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores = attribute_each(arch, tokenizer, examples, precision=precision)
        if device == "cuda":
            torch.cuda.synchronize()
        results[precision] = (time.perf_counter() - t0, scores)
    base = results["float32"][1]
    print(f"preset {args.preset}: vocab {vocab}, hidden {hidden}, ffn {ffn}, {layers} layers, weights {dtype}, "
          f"{args.examples} examples, top-{k} FFN neurons per layer, on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {torch.get_num_threads()} thread"))
    for precision, (seconds, scores) in results.items():
        err = max(float((s.ffn - b.ffn).abs().max() / b.ffn.abs().max()) for s, b in zip(scores, base))
        jac = []
        for s, b in zip(scores, base):
            for layer in range(layers):
                ours, theirs = set(s.ffn[layer].topk(k).indices.tolist()), set(b.ffn[layer].topk(k).indices.tolist())
                jac.append(len(ours & theirs) / len(ours | theirs))
        print(f"  {precision:9s} {1000 * seconds / layers:9.1f} ms/layer  {results['float32'][0] / seconds:5.2f}x float32  "
              f"largest relative error {err:.1e}  top-K Jaccard vs float32 mean {sum(jac) / len(jac):.3f} min {min(jac):.3f}")


if __name__ == "__main__":
    main()
