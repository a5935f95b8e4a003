"""Benchmark: the representation-similarity part of `laten analyze` (laten_ray/analysis/cka.py),
bounded against holding every activation.

    python bench/analyze.py                      # CPU, Qwen2.5-1.5B -> 0.5B-shaped random pair, 64 examples

Two random Qwen2 models of the published shapes (float32, the full vocabulary of 151936; token
ids come from the tiny demo tokenizer, which uses the first 512), both in one process as in
`laten analyze` without --ray, on the answer tokens of N `demo:align` examples:
  bounded  the analysis's path: per batch of examples, each module output of each layer is turned
           into U-centred Grams of pieces of at most --gram-tokens answer tokens inside its
           forward hook and dropped; the Grams are reduced to [L_t, L_s] sums at once
  held     every answer-token activation of every layer and module of both models kept (float32)
           to the end, then the same statistic computed from them
Each runs in a fresh process, so its peak RSS is its own; both CKA matrices are compared.
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
from laten_ray.analysis.cka import CKA, pieces, u_center
from laten_ray.analysis.report import memory
from laten_ray.analysis.side import Side
from laten_ray.arch import MODULES
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.data import lm_batch, read_examples
from laten_ray.hooks import Hooks

GiB = 1 << 30
QWEN = dict(vocab_size=151936, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
            max_position_embeddings=4096)
SOURCE = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, **QWEN)
TARGET = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, **QWEN)


def build(fields: dict, layers: int | None, seed: int) -> torch.nn.Module:
    config = AutoConfig.for_model("qwen2", **{**fields, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)


@torch.inference_mode()
def held_activations(side: Side, batch: dict, store: dict) -> None:
    """Append this batch's answer-token outputs of every layer and module: store[m][layer] += [n, width]."""
    mask = batch["labels"] != -100
    with Hooks() as hooks:
        for i in range(side.shape.n_layers):
            for m in MODULES:
                hooks.on_output(side.arch.part(i, m), lambda _x, out, m=m, i=i: store[m][i].append(side.arch.output(m, out)[mask].float()))
        side.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=1)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    tokenizer, examples = build_tokenizer(), read_examples("demo:align", limit=args.examples)
    t0 = time.perf_counter()
    sides = {"target": Side("target", model=build(TARGET, args.target_layers, 1), tokenizer=tokenizer),
             "source": Side("source", model=build(SOURCE, args.source_layers, 0), tokenizer=tokenizer)}
    build_s = time.perf_counter() - t0
    st, ss = sides["target"].shape, sides["source"].shape
    before, was_reset = rss_bytes(), reset_peak_rss()
    acc = CKA(st.n_layers, ss.n_layers)
    batches = [examples[i:i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    t0 = time.perf_counter()
    if args.worker == "bounded":
        for batch in batches:
            gt, gs = (sides[r].grams(batch, args.max_length, args.gram_tokens) for r in ("target", "source"))
            acc.add(gt["grams"], gs["grams"])
        forward_s, stat_s = time.perf_counter() - t0, 0.0
    else:
        store = {r: {m: [[] for _ in range(s.shape.n_layers)] for m in MODULES} for r, s in sides.items()}
        for batch in batches:
            lm = lm_batch(tokenizer, batch, args.max_length)
            for r in ("target", "source"):
                held_activations(sides[r], lm, store[r])
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in range(len(batches)):
            grams = {}
            for r in ("target", "source"):
                layers = store[r]
                sizes = pieces(layers[MODULES[0]][0][b].shape[0], args.gram_tokens)
                grams[r] = {m: [torch.stack([u_center(x @ x.T) for x in
                                             (layer[b].split(sizes)[p] for layer in layers[m])])
                                for p in range(len(sizes))] for m in MODULES}
            acc.add(grams["target"], grams["source"])
        stat_s = time.perf_counter() - t0
    peak = peak_rss_bytes()
    cka = {m: v.tolist() for m, v in acc.values().items()}
    answer = [int((lm_batch(tokenizer, b, args.max_length)["labels"] != -100).sum()) for b in batches]
    largest = max(max(pieces(n, args.gram_tokens), default=0) for n in answer)
    print(json.dumps(dict(build_s=build_s, before=before, peak=peak, reset=was_reset, forward_s=forward_s,
                          stat_s=stat_s, tokens=acc.tokens, pieces=acc.pieces, cka=cka,
                          memory=memory(st, ss, acc.tokens, largest),
                          params={r: sum(p.numel() for p in s.model.parameters()) for r, s in sides.items()},
                          layers={"target": st.n_layers, "source": ss.n_layers})))


def run(args, which: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", which, "--examples", str(args.examples),
           "--batch-size", str(args.batch_size), "--gram-tokens", str(args.gram_tokens),
           "--max-length", str(args.max_length), "--threads", str(args.threads)]
    for flag in ("source_layers", "target_layers"):
        if getattr(args, flag):
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    print(f"  running {which} ...", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["bounded", "held"], default=None)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gram-tokens", type=int, default=256)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--source-layers", type=int, default=None, help="cut the source (quick tries)")
    p.add_argument("--target-layers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"laten analyze, representation similarity: Qwen2.5-1.5B -> 0.5B-shaped random pair, float32, vocabulary "
          f"151936; {args.examples} demo:align examples, batches of {args.batch_size}, Gram pieces of at most "
          f"{args.gram_tokens} tokens; {args.threads} thread(s); peaks are RSS of a fresh process")
    results = {w: run(args, w) for w in ("bounded", "held")}
    b, h = results["bounded"], results["held"]
    print(f"  source {b['layers']['source']} layers, {b['params']['source'] / 1e9:.2f} B parameters; target "
          f"{b['layers']['target']} layers, {b['params']['target'] / 1e9:.2f} B; built in {b['build_s']:.0f}s; "
          f"{b['tokens']} answer tokens in {b['pieces']} pieces")
    print(f"  {'path':9} {'forward s':>10} {'CKA s':>7} {'total s':>8} {'before GiB':>11} {'peak GiB':>9} {'peak-before':>12}")
    for name, r in results.items():
        print(f"  {name:9} {r['forward_s']:10.1f} {r['stat_s']:7.1f} {r['forward_s'] + r['stat_s']:8.1f} "
              f"{r['before'] / GiB:11.2f} {r['peak'] / GiB:9.2f} {(r['peak'] - r['before']) / GiB:12.2f}"
              + ("" if r["reset"] else "  (high-water mark not reset: includes the build)"))
    diff = max(abs(x - y) for m in MODULES for rb, rh in zip(b["cka"][m], h["cka"][m]) for x, y in zip(rb, rh))
    print(f"  held / bounded: peak memory {h['peak'] / b['peak']:.2f}x, above the models "
          f"{(h['peak'] - h['before']) / max(1, b['peak'] - b['before']):.2f}x; seconds "
          f"{(h['forward_s'] + h['stat_s']) / (b['forward_s'] + b['stat_s']):.2f}x; CKA matrices differ by at most {diff:.1e}")
    mem = b["memory"]
    print(f"  statistics' bytes at this size: Grams per model and batch {mem['grams_per_model_batch'] / GiB:.3f} GiB; "
          f"all activations {mem['all_activations'] / GiB:.2f} GiB; exact feature-space cross-covariances "
          f"{mem['feature_space_exact'] / GiB:.0f} GiB; all-token Grams {mem['full_grams_exact'] / GiB:.1f} GiB")
    for m in MODULES:
        t = torch.tensor(b["cka"][m])
        print(f"  CKA {m:4}: mean {t.mean():.3f}, std {t.std():.3f} (random weights)")


if __name__ == "__main__":
    main()
