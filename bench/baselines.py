"""Benchmark: the sensitivity pass of the "Seeking Neural Nuggets" baseline (laten_ray/seeking.py).

    python bench/baselines.py                                     # CPU, Qwen2.5-1.5B-shaped, fp32
    python bench/baselines.py --device cuda --shape llama-13b     # a lent GPU: Llama-2-13B-shaped, bf16

A random source of the shape's size (and the target's config, for layer count and matrix shapes)
runs `seeking.extract` on a few examples of about 100 tokens, one forward and backward each:
  bounded      extract's default: hooks fold each weight's gradient into a float32 accumulator and
               drop it; pass 1 keeps per-matrix totals only, pass 2 backpropagates into the L_t
               chosen layers and keeps their full accumulators
  one pass     extract(passes=1): full accumulators for all L_s layers, one pass
  naive        every matrix's .grad kept to the end of the backward, then folded into full float32
               accumulators of all layers (the released code also keeps a per-example copy)
Each runs in a fresh process, so its peak (RSS on the CPU, allocated bytes on the GPU) is its own.
The full shape runs `bounded` only; all three run side by side with the source cut to
--compare-layers layers (the target's layer count scaled alike), where the naive path fits, and
their layer totals are checked against each other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common import peak_rss_bytes, reset_peak_rss, rss_bytes  # bench/common.py
from laten_ray.arch import Arch
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.data import Example, lm_batch, read_examples
from laten_ray.seeking import MATRICES, extract
from laten_ray.train import answer_loss

GiB = 1 << 30

# name -> (family, source config, target config): the published models' shapes
SHAPES = {
    "qwen2.5-1.5b": ("qwen2",
                     dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                          rms_norm_eps=1e-6),
                     dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                          rms_norm_eps=1e-6)),
    "llama-13b": ("llama",
                  dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, tie_word_embeddings=False),
                  dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)),
}


def configs(shape: str, layers: int | None):
    """(source config, target config); with `layers`, the source has that many and the target as
    many as keeps the published ratio."""
    family, src, tgt = SHAPES[shape]
    src, tgt = dict(src), dict(tgt)
    if layers:
        tgt["num_hidden_layers"] = max(1, round(layers * tgt["num_hidden_layers"] / src["num_hidden_layers"]))
        src["num_hidden_layers"] = layers
    make = lambda c: AutoConfig.for_model(family, max_position_embeddings=4096, attention_dropout=0.0, **c)
    return make(src), make(tgt)


def build(config, dtype: torch.dtype, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def bench_examples(n: int) -> list[Example]:
    """n examples of about 100 tokens (the tiny tokenizer's ids fit any vocabulary): two demo
    questions in one prompt, their two answers as the answer."""
    demo = read_examples("demo:align", limit=2 * n)
    out = []
    for i in range(n):
        group = demo[2 * i:2 * i + 2]
        out.append(Example(({"role": "user", "content": "\n\n".join(e.messages[0]["content"] for e in group)},
                            {"role": "assistant", "content": " ".join(e.answer for e in group)}), f"bench{i}"))
    return out


def naive(model, tokenizer, examples, max_length: int) -> torch.Tensor:
    """Every .grad kept through the backward, then folded into full accumulators. Totals [L, 7]."""
    arch = Arch(model)
    weights = {(i, m): arch.weight(i, m) for i in range(arch.shape.n_layers) for m in MATRICES}
    acc = {k: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for k, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    for example in examples:
        batch = lm_batch(tokenizer, [example], max_length)
        n_tokens = int((batch["labels"][:, 1:] != -100).sum())
        answer_loss(arch, batch, n_tokens).backward()
        for k, w in weights.items():
            acc[k] += (w.detach().float() * w.grad.float()).abs_()
            w.grad = None
    return torch.tensor([[float(acc[(i, m)].sum(dtype=torch.float64)) for m in MATRICES]
                         for i in range(arch.shape.n_layers)], dtype=torch.float64)


# --- one measurement, in a fresh process --------------------------------------------------------
def worker(args) -> None:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    src_cfg, tgt_cfg = configs(args.shape, args.layers)
    tokenizer, examples = build_tokenizer(), bench_examples(args.examples)
    tokens = [len(lm_batch(tokenizer, [e], args.max_length)["input_ids"][0]) for e in examples]
    t0 = time.perf_counter()
    model = build(src_cfg, dtype, args.device)
    build_s = time.perf_counter() - t0
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        before, was_reset = torch.cuda.memory_allocated(), True
        torch.cuda.reset_peak_memory_stats()
    else:
        before, was_reset = rss_bytes(), reset_peak_rss()
    t0 = time.perf_counter()
    if args.worker == "naive":
        totals = naive(model, tokenizer, examples, args.max_length)
        seconds = {"pass1": time.perf_counter() - t0}
    else:
        plan = extract(model, tokenizer, tgt_cfg, examples, rank=16, max_length=args.max_length,
                       gradient_checkpointing=args.checkpointing, passes=2 if args.worker == "bounded" else 1)
        totals, seconds = torch.tensor(plan.layer_totals), plan.seconds
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    matrices = sum(Arch(model).weight(i, m).numel() for i in range(src_cfg.num_hidden_layers) for m in MATRICES)
    capacity = torch.cuda.mem_get_info()[1] if cuda else None
    print(json.dumps(dict(build_s=build_s, before=before, peak=peak, reset=was_reset, seconds=seconds,
                          capacity=capacity, element_size=model.get_input_embeddings().weight.element_size(),
                          layer_totals=totals.reshape(src_cfg.num_hidden_layers, -1).sum(1).tolist(),
                          params=sum(p.numel() for p in model.parameters()), matrices=matrices,
                          layers=src_cfg.num_hidden_layers, target_layers=tgt_cfg.num_hidden_layers,
                          tokens=tokens)))


def run(args, mode: str, layers: int | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, "--shape", args.shape,
           "--device", args.device, "--dtype", args.dtype, "--examples", str(args.examples),
           "--max-length", str(args.max_length), "--threads", str(args.threads)]
    cmd += ["--layers", str(layers)] if layers else []
    cmd += ["--checkpointing"] if args.checkpointing else []
    print(f"  running {mode} ({layers or 'all'} layers) ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # a failure is a row
    if proc.returncode:
        print(f"  {mode}: failed (exit {proc.returncode}; out of memory?)")
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_bytes(full: dict) -> int:
    """Memory a fresh process may use now: the GPU's size, or the machine's MemAvailable."""
    if full["capacity"]:
        return full["capacity"]
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def table(rows: list[tuple[str, dict]], where: str) -> None:
    print(f"  {'path':<12}{'pass 1 s':>10}{'pass 2 s':>10}{'reduce s':>10}{'total s':>10}"
          f"{'before GiB':>12}{'peak GiB':>10}{'peak-before':>13}")
    for name, r in rows:
        if not r:
            print(f"  {name:<12}{'failed (out of memory?)':>30}")
            continue
        s = r["seconds"]
        cells = "".join(f"{s[k]:>10.1f}" if k in s else f"{'-':>10}" for k in ("pass1", "pass2", "reduce"))
        print(f"  {name:<12}{cells}{sum(s.values()):>10.1f}{r['before'] / GiB:>12.2f}{r['peak'] / GiB:>10.2f}"
              f"{(r['peak'] - r['before']) / GiB:>13.2f}")
    if not all(r.get("reset", True) for _, r in rows):
        print(f"  (could not reset the {where} high-water mark: peaks include the model build)")


def compare(rows: dict) -> None:
    """Naive against the others: layer totals, peak memory, sensitivity seconds."""
    n = rows.get("naive")
    if not n:
        return
    for name in ("bounded", "one-pass"):
        r = rows.get(name)
        if not r:
            continue
        diff = max(abs(x - y) / abs(y) for x, y in zip(r["layer_totals"], n["layer_totals"]))
        sens = sum(v for k, v in r["seconds"].items() if k != "reduce")
        print(f"  naive / {name + ':':<10} peak memory {n['peak'] / r['peak']:.2f}x (above the model "
              f"{(n['peak'] - n['before']) / (r['peak'] - r['before']):.2f}x); sensitivity seconds "
              f"{n['seconds']['pass1'] / sens:.2f}x; layer totals differ by {diff:.1e} (relative)")


def describe(r: dict, args) -> str:
    return (f"{r['layers']} source layers ({r['params'] / 1e9:.2f} B parameters, {r['matrices'] / 1e9:.2f} B in "
            f"the seven matrices), {r['target_layers']} target layers, {args.dtype}, {args.device}; "
            f"{len(r['tokens'])} examples of {r['tokens']} tokens; built in {r['build_s']:.0f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="default: qwen2.5-1.5b on the CPU, llama-13b on cuda")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on cuda")
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--layers", type=int, default=0, help="source layers of the full run (0: the shape's)")
    p.add_argument("--compare-layers", type=int, default=8,
                   help="source layers of the side-by-side run (0: skip it)")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in extract")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=["bounded", "one-pass", "naive"], help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama-13b" if cuda else "qwen2.5-1.5b")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    where = "GPU allocated" if cuda else "RSS"
    print(f"Seeking Neural Nuggets sensitivity, {args.shape}-shaped random source; {args.threads} thread(s); "
          f"peaks are {where}; gradient checkpointing {'on' if args.checkpointing else 'off'}")
    print("\nFull shape:")
    full = run(args, "bounded", args.layers or None)
    rows = {"bounded": full}
    if full:
        print(f"  {describe(full, args)}")
        # the naive path adds a gradient and a float32 accumulator per matrix element; it runs
        # only where that fits with 2 GiB to spare (an out-of-memory kill could hit other processes)
        need = full["before"] + full["matrices"] * (full["element_size"] + 4) + 2 * GiB
        if need < available_bytes(full):
            rows["naive"] = run(args, "naive", args.layers or None)
        else:
            print(f"  naive skipped: needs about {need / GiB:.1f} GiB, {available_bytes(full) / GiB:.1f} GiB available")
    table(list(rows.items()), where)
    compare(rows)
    if args.compare_layers:
        print(f"\nSide by side, the source cut to {args.compare_layers} layers:")
        rows = {m: run(args, m, args.compare_layers) for m in ("bounded", "one-pass", "naive")}
        done = [r for r in rows.values() if r]
        if done:
            print(f"  {describe(done[0], args)}")
        table(list(rows.items()), where)
        compare(rows)


if __name__ == "__main__":
    main()
