"""Benchmark: one training step with sparse injection (laten_ray.inject hooks) vs dense deltas.

    python bench/train_step.py
    python bench/train_step.py --micro-batch 16

Both variants run the same step as laten_ray.train.Trainer.step (TargetTraining.step minus the
target's own attribution, not what is measured here): hypernet forward, deltas as leaves, LM
loss over micro-batches (summed, normalised by answer tokens), reg = lambda * mean(delta^2) per
module, backward through the hypernet, AdamW step.
  sparse  laten_ray.inject.injected: forward hooks touch only the K rows/columns
  dense   for every layer and module a full-size zero matrix D gets the K rows/columns written in
          (index_put, differentiable) and the target runs with W + D via torch.func.functional_call
Each variant runs in its own fresh process, so its peak RSS (ru_maxrss) is its own. Source
slices are random tensors of the right shape; the source model itself is not needed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.func import functional_call

from common import peak_rss_bytes, random_llama, reset_peak_rss, rss_bytes  # bench/common.py
from laten_ray.arch import MODULES, NEURON_AXIS, Arch
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.data import lm_batch, read_examples
from laten_ray.hypernet import HyperNet
from laten_ray.inject import injected
from laten_ray.locate import neuron_counts
from laten_ray.train import answer_loss, hypernet_backward

MiB = 1 << 20
VARIANTS = ("sparse", "dense")


# --- setup --------------------------------------------------------------------------------------
def target_model(args) -> torch.nn.Module:
    """A frozen random Llama target, identical in every process (fixed seed)."""
    return random_llama(args.vocab, args.hidden, args.ffn, args.layers, args.heads)


def selection(arch: Arch, rate: float, d_source: int) -> tuple[dict, dict]:
    """Random target indices (module -> [L, K]) and random source slices (module -> [L, K, d_s])."""
    s = arch.shape
    gen = torch.Generator().manual_seed(1)
    index, slices = {}, {}
    for m, k in neuron_counts(s, rate, MODULES).items():
        index[m] = torch.stack([torch.randperm(s.neurons(m), generator=gen)[:k] for _ in range(s.n_layers)])
        slices[m] = 0.02 * torch.randn(s.n_layers, k, d_source, generator=gen)
    return index, slices


def dense_weights(arch: Arch, index: dict, deltas: dict) -> dict[str, torch.Tensor]:
    """W + D for every edited weight, D full-size and zero except the K rows/columns. Names are
    relative to the decoder (arch.base()), which the dense variant calls functionally."""
    prefix = arch.family.layers[len(arch.family.base) + 1:]     # "layers"
    out = {}
    for m, d in deltas.items():                                  # d [L, K, d_t]
        for layer in range(d.shape[0]):
            w = arch.weight(layer, m)                            # [out, in]
            idx = index[m][layer]                                # [K]
            rows = d[layer].to(w.dtype)                          # [K, d_t], as the hooks cast
            if NEURON_AXIS[m] == 0:                              # up, v: rows
                dense = w.new_zeros(w.shape).index_put((idx,), rows)                        # [n, d_t]
            else:                                                # down, o: columns
                dense = w.new_zeros(w.shape[1], w.shape[0]).index_put((idx,), rows).T       # [d_t, n]
            out[f"{prefix}.{layer}.{getattr(arch.family, m)}.weight"] = w + dense
    return out


def make_micro_step(variant: str, arch: Arch, index: dict, n_tokens: int):
    """Forward + backward of one micro-batch with sparse hooks or dense W + D; returns its loss."""
    def micro_step(leaves, batch) -> float:
        if variant == "sparse":
            with injected(arch, index, leaves):  # backward inside: checkpointing re-runs hooks
                loss = answer_loss(arch, batch, n_tokens)
                loss.backward()
        else:
            weights = dense_weights(arch, index, leaves)
            loss = answer_loss(arch, batch, n_tokens,
                               base=lambda **inputs: functional_call(arch.base(), weights, (), inputs))
            loss.backward()
        return loss.item()
    return micro_step


def train_step(variant, model, arch, hypernet, optimizer, index, slices, batches, n_tokens,
               reg_lambda, grads_path=None) -> tuple[float, float]:
    """One optimizer step; returns (lm loss, reg loss). Saves the hypernet grads if grads_path."""
    lm_loss, reg = hypernet_backward(hypernet, slices, batches,
                                     make_micro_step(variant, arch, index, n_tokens), reg_lambda)
    if grads_path:
        torch.save({n: p.grad for n, p in hypernet.named_parameters()}, grads_path)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lm_loss, reg


def worker(args) -> None:
    """In a fresh process: set up, a warm-up step (its loss and grads are the ones checked), then
    timed steps; print one JSON line."""
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    examples = (read_examples("demo:extract", limit=1) + read_examples("demo:align"))[:args.examples]
    batches = [lm_batch(tokenizer, examples[i:i + args.micro_batch], args.max_length)
               for i in range(0, len(examples), args.micro_batch)]
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    model = target_model(args)
    arch = Arch(model)
    index, slices = selection(arch, args.rate, args.source_hidden)
    torch.manual_seed(2)
    hypernet = HyperNet(args.source_hidden, arch.shape.hidden, MODULES)
    optimizer = torch.optim.AdamW(hypernet.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    build_peak = peak_rss_bytes()
    before = rss_bytes()
    was_reset = reset_peak_rss()

    step = lambda path=None: train_step(args.worker, model, arch, hypernet, optimizer, index, slices,
                                        batches, n_tokens, args.reg_lambda, path)
    t0 = time.perf_counter()
    lm_loss, reg_loss = step(args.grads)  # warm-up, on the same initial hypernet in both variants
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(before=before, peak=peak_rss_bytes(), build_peak=build_peak, reset=was_reset,
                          lm_loss=lm_loss, reg_loss=reg_loss, warm_s=warm_s, times=times,
                          tokens=n_tokens, seq=[tuple(b["input_ids"].shape) for b in batches],
                          K={m: i.shape[1] for m, i in index.items()})))


def run_variant(args, variant: str, steps: int, live_rss: bool, grads_path: str | None = None) -> dict:
    """Run one variant in a fresh process. live_rss: make freed tensors go back to the OS (glibc
    otherwise raises its mmap threshold after big frees and keeps freed memory in its heap, so
    RSS drifts with fragmentation instead of tracking live tensors; costs page faults, so the
    timing runs keep glibc's defaults)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--steps", str(steps)]
    cmd += ["--grads", grads_path] if grads_path else []
    for key, value in vars(args).items():
        if key not in ("worker", "grads", "steps"):
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536") if live_rss else None
    print(f"running {variant} ({'memory' if live_rss else 'timing'}) in a fresh process ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Defaults: Llama-2 13B -> 7B at 1/8 of the width with all 32 target layers, so the edited
    # weights and the hypernetwork keep their real proportions (dense copies ~20x the hypernet).
    p.add_argument("--source-hidden", type=int, default=640, help="d_s of the slices")
    p.add_argument("--hidden", type=int, default=512, help="target hidden size")
    p.add_argument("--ffn", type=int, default=1376, help="target FFN width")
    p.add_argument("--layers", type=int, default=32, help="target layers")
    p.add_argument("--heads", type=int, default=4, help="target attention heads (MHA)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--examples", type=int, default=16, help="1 demo extract example + align examples")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    p.add_argument("--reg-lambda", type=float, default=1000.0)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--grads", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)

    # Per variant: a memory run (warm-up + 1 step, RSS tracks live tensors, first-step loss and
    # grads saved for the check) and a timing run (warm-up + args.steps, glibc defaults).
    with tempfile.TemporaryDirectory() as tmp:
        grads = {v: os.path.join(tmp, f"{v}.pt") for v in VARIANTS}
        mem = {v: run_variant(args, v, 1, True, grads[v]) for v in VARIANTS}
        timing = {v: run_variant(args, v, args.steps, False) for v in VARIANTS}
        g_sparse, g_dense = (torch.load(grads[v]) for v in VARIANTS)
    sp, de = mem["sparse"], mem["dense"]
    median = {v: statistics.median(timing[v]["times"]) for v in VARIANTS}
    print(f"\ntarget Llama: hidden {args.hidden}, FFN {args.ffn}, {args.layers} layers, {args.heads} heads, "
          f"vocab {args.vocab}, fp32; d_s {args.source_hidden}; rate {args.rate}, K {sp['K']}")
    print(f"batch: {args.examples} examples, micro-batches {sp['seq']}, {sp['tokens']} answer tokens; "
          f"{args.threads} thread(s)")
    print()
    print(f"{'':<44}{'sparse':>10}{'dense':>10}{'dense/sparse':>14}")

    def row(name, key, fmt="{:.0f}"):
        a, b = key(sparse=True), key(sparse=False)
        print(f"{name:<44}{fmt.format(a):>10}{fmt.format(b):>10}{b / a:>13.2f}x")
    pick = lambda runs, f: lambda sparse: f(runs["sparse" if sparse else "dense"])
    print("memory run (MALLOC_MMAP_THRESHOLD_=65536), MiB:")
    row("  RSS before step (model loaded)", pick(mem, lambda r: r["before"] / MiB))
    row("  peak RSS during warm-up + 1 step", pick(mem, lambda r: r["peak"] / MiB))
    row("  peak - before", pick(mem, lambda r: (r["peak"] - r["before"]) / MiB))
    row("  process peak incl. model build", pick(mem, lambda r: max(r["peak"], r["build_peak"]) / MiB))
    print(f"timing run (glibc defaults), warm-up + {args.steps} steps:")
    row("  peak - before, MiB", pick(timing, lambda r: (r["peak"] - r["before"]) / MiB))
    row("  process peak incl. model build, MiB", pick(timing, lambda r: max(r["peak"], r["build_peak"]) / MiB))
    row("  warm-up step, s", pick(timing, lambda r: r["warm_s"]), "{:.2f}")
    row(f"  step, s (median of {args.steps})", lambda sparse: median["sparse" if sparse else "dense"], "{:.2f}")
    for v in VARIANTS:
        print(f"  {v} step times (s): {[round(t, 2) for t in timing[v]['times']]}")
    if not all(r["reset"] for r in (*mem.values(), *timing.values())):
        print("note: the RSS high-water mark could not be reset; peaks include the model build")
    print()
    print("check on the first step (same hypernet init, same batch):")
    print(f"  lm loss  sparse {sp['lm_loss']:.6f}  dense {de['lm_loss']:.6f}  diff {abs(sp['lm_loss'] - de['lm_loss']):.2e}")
    print(f"  reg loss sparse {sp['reg_loss']:.6e}  dense {de['reg_loss']:.6e}  diff {abs(sp['reg_loss'] - de['reg_loss']):.2e}")
    diff = max((g_sparse[n] - g_dense[n]).abs().max().item() for n in g_sparse)
    scale = max(g_sparse[n].abs().max().item() for n in g_sparse)
    print(f"  hypernet grads: max abs diff {diff:.3e} (max abs grad {scale:.3e})")
    print()
    ratio = (de["peak"] - de["before"]) / max(sp["peak"] - sp["before"], 1)
    print(f"peak memory (peak - before, memory run) dense/sparse: {ratio:.2f}x  (target >= 2x)")
    print(f"step time (median, timing run) dense/sparse:          {median['dense'] / median['sparse']:.2f}x")


if __name__ == "__main__":
    main()
