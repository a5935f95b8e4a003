"""GPU check at Llama-2 13B -> 7B shapes (random weights, bf16 models, fp32 attribution math).

Runs attribution for 8 examples on each model, then 2 training steps (source locate + target
locate + hypernetwork step), on one GPU, and prints seconds per phase and peak GPU memory.

    python bench/gpu_llama.py [--shapes llama2 | tiny] [--data SPEC] [--out FILE.json]

`--shapes tiny` runs the same script with small shapes on CPU, to check it before a GPU run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from common import random_llama  # bench/common.py
from laten_ray.arch import Arch
from laten_ray.attribution import attribute
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.checks import checked_from_dict
from laten_ray.data import lm_batch, read_examples
from laten_ray.locate import Source, locate_source, locate_target, neuron_counts
from laten_ray.train import TargetTraining, hypernet_backward

SHAPES = {
    "llama2": {  # Llama-2-13B and Llama-2-7B
        "source": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40),
        "target": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    },
    "tiny": {
        "source": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=4),
        "target": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4),
    },
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(label, results, fn):
    sync()
    t0 = time.perf_counter()
    value = fn()
    sync()
    results[label] = round(time.perf_counter() - t0, 3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"{label:<34} {results[label]:>9.2f} s   peak GPU {peak:6.1f} GiB", flush=True)
    return value


def build(shape: dict, device: str, dtype: torch.dtype, seed: int):
    return random_llama(32000, shape["hidden_size"], shape["intermediate_size"],
                        shape["num_hidden_layers"], shape["num_attention_heads"], seed, dtype, device,
                        max_position_embeddings=4096, rms_norm_eps=1e-5)


def sparse_vs_dense(side: TargetTraining, located, results: dict) -> None:
    """Memory and time of one more hypernetwork step (same batch, same slices) with sparse
    injection vs full-size dense deltas (bench/train_step.py's dense_weights)."""
    from train_step import make_micro_step  # bench/train_step.py
    target, hypernet, t = side.target, side.trainer.hypernet, side.cfg.train
    arch = target.arch
    index = {m: i.to(target.model.device) for m, i in side.select(1).index.items()}  # [L_t, K]
    examples = side.batch_examples(1)
    batches = [lm_batch(target.tokenizer, examples[i:i + t.micro_batch_size], 512)
               for i in range(0, len(examples), t.micro_batch_size)]
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    for variant in ("sparse", "dense", "sparse+checkpointing"):
        if variant == "sparse+checkpointing":  # the target's layers recomputed in backward
            target.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            target.model.train()
        hypernet.zero_grad(set_to_none=True)
        sync()
        before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        lm, _ = timed(f"{variant} step, no optimizer (16 examples)", results,
                      lambda: hypernet_backward(hypernet, located.slices, batches,
                                                make_micro_step(variant.split("+")[0], arch, index, n_tokens),
                                                t.reg_lambda))
        if torch.cuda.is_available():
            results[f"{variant}_step_extra_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)
            print(f"    {variant}: lm_loss {lm:.5f}, peak above the loaded state "
                  f"{results[f'{variant}_step_extra_gib']} GiB", flush=True)
    target.model.eval()
    hypernet.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        ratio = results["dense_step_extra_gib"] / max(results["sparse_step_extra_gib"], 1e-9)
        results["dense_over_sparse_memory"] = round(ratio, 2)
        print(f"dense/sparse step memory: {ratio:.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama2", choices=SHAPES)
    ap.add_argument("--data", default="demo:train",
                    help="data spec (align + extract), e.g. data/gsm/gsm_train_split.jsonl")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--chunk-mb", type=int, default=2048)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "shapes": args.shapes, "rate": args.rate}
    tok = build_tokenizer()
    examples = read_examples(args.data, limit=24)
    extract, align = examples[:8], examples[8:]

    shapes = SHAPES[args.shapes]
    source_model = timed("build source (random init)", results, lambda: build(shapes["source"], device, dtype, 0))
    target_model = timed("build target (random init)", results, lambda: build(shapes["target"], device, dtype, 1))
    src, tgt = Arch(source_model), Arch(target_model)
    budget = args.chunk_mb << 20

    s_scores = timed("attribution source, 8 examples", results,
                     lambda: attribute(src, tok, extract, batch_size=8, budget_bytes=budget))
    t_scores = timed("attribution target, 8 examples", results,
                     lambda: attribute(tgt, tok, extract, batch_size=8, budget_bytes=budget))
    counts = neuron_counts(tgt.shape, args.rate, ["up", "down", "v", "o"])
    located = timed("locate + slices (from 8-example scores)", results,
                    lambda: locate_source(src, s_scores, tgt.shape, counts))
    locate_target(t_scores, tgt.shape, counts)
    results["slice_mb"] = round(located.nbytes() / 2**20, 1)
    print(f"slices per step: {results['slice_mb']} MB  K={counts}", flush=True)

    cfg = checked_from_dict({
        "name": "gpu-bench", "output_dir": "/tmp/laten-gpu-bench",
        "source": {"model": "tiny:llama-source"}, "target": {"model": "tiny:llama-target"},
        "data": {"align": args.data, "extract": args.data, "max_length": 512},
        "transfer": {"rate": args.rate}, "attribution": {"chunk_mb": args.chunk_mb},
        "train": {"steps": 2, "align_per_step": 15, "micro_batch_size": args.micro_batch}})
    source = Source(cfg, model=source_model, tokenizer=tok)
    side = timed("trainer setup (hypernet, optimizer)", results,
                 lambda: TargetTraining(cfg, src.shape.hidden, model=target_model, tokenizer=tok))
    side.extract, side.align = extract, align
    for step in range(2):
        loc = timed(f"step {step + 1}: source locate (1 example)", results,
                    lambda: source.locate([extract[step]], tgt.shape, side.target.counts)[0])
        m = timed(f"step {step + 1}: trainer step (16 examples)", results, lambda: side.step(step, loc))
        print(f"    lm_loss {m['lm_loss']:.4f}  reg {m['reg_loss']:.3e}  tokens {m['tokens']}  "
              f"target attribution {m['target_attribution_s']:.2f} s", flush=True)
    sparse_vs_dense(side, loc, results)
    if device == "cuda":
        results["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"peak GPU memory allocated: {results['peak_gpu_gib']} GiB", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
