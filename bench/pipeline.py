"""Source/target pipelining on Ray: the same training job with look-ahead 0 (the two actors
strictly alternate) and look-ahead 2, side by side in one run on one local Ray instance.

Prints the steady-state seconds per step of both and their ratio (target: look-ahead 2 at most
0.65x of look-ahead 0), the slice bytes sent per step against the full source model's size,
and the share of each step the target spent waiting for slices.

The two random Llamas (vocabulary of the tiny tokenizer) are sized so that one example's
source attribution costs about what one target step costs; each actor gets one CPU thread.

    python bench/pipeline.py [--steps 12] [--device cpu|cuda] [--transport object_store]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.common import random_llama  # noqa: E402
from laten_ray.builtin.tiny import TINY_VOCAB, build_tokenizer  # noqa: E402


def build(folder: Path, tokenizer, seed: int, dtype: str, device: str, **shape) -> int:
    """Save a random Llama with the tiny tokenizer; return its size in bytes."""
    from laten_ray.models import TORCH_DTYPES
    model = random_llama(TINY_VOCAB, seed=seed, dtype=TORCH_DTYPES[dtype], device=device, **shape)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def config(models: Path, out: Path, name: str, lookahead: int, args) -> dict:
    gpu = args.device == "cuda"
    return {
        "name": name, "output_dir": str(out), "seed": 0,
        "source": {"model": str(models / "source"), "device": args.device, "dtype": args.dtype},
        "target": {"model": str(models / "target"), "device": args.device, "dtype": args.dtype},
        "data": {"align": "demo:align", "extract": "demo:extract", "max_length": 128},
        "transfer": {"rate": 0.1},
        # one example per source call, so the source's work per step is even
        "attribution": {"batch_size": 1, "chunk_mb": 64},
        "train": {"steps": args.steps, "align_per_step": args.align_per_step,
                  "micro_batch_size": args.align_per_step + 1, "lr": 3e-4},
        "ray": {"lookahead": lookahead, "transport": args.transport,
                # both actors share this machine's one GPU when there is one
                "source": {"num_cpus": 1, **({"num_gpus": 0.5} if gpu else {})},
                "target": {"num_cpus": 1, **({"num_gpus": 0.5} if gpu else {})}},
    }


def run(cfg_dict: dict) -> list[dict]:
    from jobs.train import train_on_ray
    from laten_ray.checks import checked_from_dict
    steps: list[dict] = []
    train_on_ray(checked_from_dict(cfg_dict), on_step=steps.append)
    return steps


def summary(steps: list[dict], warmup: int) -> dict:
    steady = steps[warmup:]
    wall = [m["wall_s"] for m in steady]
    return {"step_s": statistics.mean(wall), "step_s_median": statistics.median(wall),
            "target_s": statistics.mean(m["step_s"] for m in steady),
            "source_s": statistics.mean(m["source_attribution_s"] for m in steady),
            "wait_share": sum(m["slice_wait_s"] for m in steady) / sum(wall),
            "slice_bytes": statistics.mean(m["slice_bytes"] for m in steady)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--transport", default="object_store")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--align-per-step", type=int, default=15)
    p.add_argument("--source", default="1024,2816,28,16", help="hidden,ffn,layers,heads")
    p.add_argument("--target", default="512,1408,8,8", help="hidden,ffn,layers,heads")
    args = p.parse_args()

    import ray
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="laten-bench-pipeline-"))
    tokenizer = build_tokenizer()
    shapes = {}
    for i, role in enumerate(("source", "target")):
        hidden, ffn, layers, heads = map(int, getattr(args, role).split(","))
        shapes[role] = dict(hidden=hidden, ffn=ffn, layers=layers, heads=heads)
        size = build(root / "models" / role, tokenizer, i, args.dtype, args.device, **shapes[role])
        shapes[role]["bytes"] = size
    print(f"source {shapes['source']}, target {shapes['target']}, vocab {TINY_VOCAB}, "
          f"{args.steps} steps ({args.warmup} warm-up), 1 + {args.align_per_step} examples per step, "
          f"{args.dtype} on {args.device}, transport {args.transport}", flush=True)
    ray.init(num_cpus=2, num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False,
             log_to_driver=False)
    results = {}
    for lookahead in (0, 2):
        t0 = time.perf_counter()
        steps = run(config(root / "models", root / "runs", f"lookahead{lookahead}", lookahead, args))
        results[lookahead] = summary(steps, args.warmup)
        r = results[lookahead]
        print(f"look-ahead {lookahead}: {r['step_s']:.3f} s/step (median {r['step_s_median']:.3f}); "
              f"target busy {r['target_s']:.3f} s, source attribution {r['source_s']:.3f} s per step; "
              f"waiting for slices {100 * r['wait_share']:.1f}% of the step; job {time.perf_counter() - t0:.1f} s",
              flush=True)
    ray.shutdown()
    ratio = results[2]["step_s"] / results[0]["step_s"]
    sent = results[2]["slice_bytes"]
    print(f"step time, look-ahead 2 / look-ahead 0: {ratio:.3f}x (target <= 0.65x: "
          f"{'met' if ratio <= 0.65 else 'NOT met'})")
    print(f"slices sent per step: {sent / 1e6:.2f} MB = {100 * sent / shapes['source']['bytes']:.2f}% "
          f"of the full source model ({shapes['source']['bytes'] / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
