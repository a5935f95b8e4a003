"""Benchmark: batched exact attribution vs per-example projection vs the literal per-neuron loop.

    python bench/attribution.py                 # all parts (the Qwen-shaped part takes minutes)
    python bench/attribution.py --skip-qwen     # only the Llama comparison
    python bench/attribution.py --skip-llama --skip-qwen   # only the score cache (about a minute)
    python bench/attribution.py --only-kernels  # the scoring kernels, series against exact
    python bench/attribution.py --only-families # one shape per model family, against Llama's

Kernels part: the paper code's anchor shape (random Llama hidden 512, FFN 1376, 6 layers, 8
heads, vocab 32000, fp32, one thread): seconds per example at batch 1, 8 and 64 for the exact
scoring pass (five passes over each [B, nc, vc] logits block) and the series one
(attribution.kernel: series: the cumulant series for the pairs it holds for, the exact pass for
the rest), side by side, each against the paper's code on that shape (94.4 s per example,
measured side by side with this project on the same machine kind when issue 22 was filed; its
code is not part of this repository, so it is not re-run here). Also the largest difference
between the two, the share of pairs the series took, and each kernel's error against a float64
computation of one random layer.

Llama part: a random Llama (hidden 1024, FFN 2816, 8 layers, 16 heads, vocab 32000, fp32) scores
the same examples three ways:
  batched       laten_ray.attribution.attribute: one projection W_U diag(g) W per layer, shared
                by the whole batch
  per-example   the same exact math, but capture + score_captured once per example, so the
                projection is recomputed for every example (timed in full)
  per-neuron    reference.attribute_per_neuron's literal loop (one full unembedding matvec per
                neuron); timed on a sample of neurons of the first example and extrapolated
Qwen part: peak RSS of `attribute` on a Qwen2.5-1.5B-shaped random model (bf16), in a fresh
process.
Cache part: the same Llama attributes one batch through `locate.Source` with a score cache
(laten_ray/score_cache.py): cold (a miss: model hash, attribution, write), warm (a hit), and
warm in a fresh Source (model hash again, then a hit), side by side.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from common import peak_rss_bytes, random_llama, reset_peak_rss, rss_bytes  # bench/common.py
from laten_ray.arch import Arch
from laten_ray.attribution import Scores, attribute, capture, score_captured
from laten_ray.builtin.tiny import build_tokenizer
from laten_ray.config import config_from_dict
from laten_ray.data import attribution_batch, attribution_ids, read_examples
from laten_ray.locate import Source
from laten_ray.reference import _trace
from laten_ray.score_cache import model_hash

GiB = 1 << 30


# --- models -------------------------------------------------------------------------------------
def llama_model(args) -> torch.nn.Module:
    return random_llama(args.vocab, args.hidden, args.ffn, args.layers, args.heads)


def qwen_model() -> torch.nn.Module:
    """Qwen2.5-1.5B's shape with random weights, built directly in bfloat16."""
    cfg = AutoConfig.for_model(
        "qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
        rms_norm_eps=1e-6, max_position_embeddings=32768)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().requires_grad_(False)


def first_layers(arch: Arch, n: int) -> Arch:
    """A view of `arch` whose attribution hooks and scores cover only its first n layers (the
    forward pass still runs the whole model). Used to shorten the Qwen run."""
    view = copy.copy(arch)
    view.shape = dataclasses.replace(arch.shape, n_layers=n)
    return view


# --- the three ways to score --------------------------------------------------------------------
@torch.inference_mode()
def per_example_projection(arch: Arch, tokenizer, examples, budget_bytes: int) -> tuple[Scores, Scores]:
    """Exact scores with the projection recomputed per example. Returns (sum, first example's)."""
    total, first = None, None
    for example in examples:
        scores = score_captured(arch, capture(arch, attribution_batch(tokenizer, [example])), budget_bytes)
        first = scores if first is None else first
        total = scores if total is None else total + scores
    return total, first


@torch.inference_mode()
def per_neuron_sample(arch: Arch, tokenizer, example, ffn_idx: torch.Tensor, attn_idx: torch.Tensor) -> dict:
    """reference.attribute_per_neuron for one example, restricted to sampled neurons.

    ffn_idx [L, nf], attn_idx [L, na] -> scores at those neurons, layer scores, and the time of
    the fixed part (trace, per-layer bases) and of the FFN / attention neuron loops."""
    s = arch.shape
    t0 = time.perf_counter()
    head = arch.lm_head().weight.float()  # [V, d]
    g = arch.final_norm().weight.float()  # [d]
    ids, w = attribution_ids(tokenizer, example)
    got = _trace(arch, ids)
    r = torch.sqrt(got["resid_final"].pow(2).mean() + s.eps)

    def log_p(y: torch.Tensor) -> float:
        return torch.log_softmax(head @ (g * y / r), dim=-1)[w].item()

    L = s.n_layers
    ffn, attn = torch.zeros(ffn_idx.shape), torch.zeros(attn_idx.shape)  # [L, nf], [L, na]
    layer_attn, layer_ffn = torch.zeros(L), torch.zeros(L)
    t_fixed, t_ffn, t_attn = time.perf_counter() - t0, 0.0, 0.0
    for i in range(L):
        t0 = time.perf_counter()
        h_in = got["resid_pre"][i]
        h_mid = h_in + got["attn_out"][i]
        m = arch.part(i, "down")(got["mlp_act"][i].to(arch.weight(i, "down").dtype)).float()
        base_in, base_mid = log_p(h_in), log_p(h_mid)
        layer_attn[i] = base_mid - base_in
        layer_ffn[i] = log_p(h_mid + m) - base_mid
        w_down, w_o = arch.weight(i, "down").float(), arch.weight(i, "o").float()
        t1 = time.perf_counter()
        for j, k in enumerate(ffn_idx[i].tolist()):
            ffn[i, j] = log_p(h_mid + got["mlp_act"][i][k] * w_down[:, k]) - base_mid
        t2 = time.perf_counter()
        for j, k in enumerate(attn_idx[i].tolist()):
            attn[i, j] = log_p(h_in + got["attn_heads"][i][k] * w_o[:, k]) - base_in
        t3 = time.perf_counter()
        t_fixed, t_ffn, t_attn = t_fixed + t1 - t0, t_ffn + t2 - t1, t_attn + t3 - t2
    return dict(ffn=ffn, attn=attn, layer_attn=layer_attn, layer_ffn=layer_ffn,
                t_fixed=t_fixed, t_ffn=t_ffn, t_attn=t_attn)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- Llama comparison ---------------------------------------------------------------------------
def llama_part(args, tokenizer, examples) -> None:
    t0 = time.perf_counter()
    model = llama_model(args)
    arch = Arch(model)
    s = arch.shape
    budget = args.chunk_mb << 20
    print(f"Llama: hidden {s.hidden}, FFN {s.ffn}, {s.n_layers} layers, {s.n_heads} heads, vocab {s.vocab}, "
          f"fp32; {len(examples)} examples; built in {time.perf_counter() - t0:.1f}s; "
          f"{torch.get_num_threads()} thread(s)")

    print("timing batched attribute ...", flush=True)
    t0 = time.perf_counter()
    batched = attribute(arch, tokenizer, examples, batch_size=args.batch_size, budget_bytes=budget)
    t_batched = time.perf_counter() - t0

    print("timing per-example projection ...", flush=True)
    t0 = time.perf_counter()
    per_example, first = per_example_projection(arch, tokenizer, examples, budget)
    t_per_example = time.perf_counter() - t0

    print("timing sampled per-neuron loop ...", flush=True)
    gen = torch.Generator().manual_seed(0)
    nf, na = min(args.sample_ffn, s.ffn), min(args.sample_attn, s.attn_width)
    ffn_idx = torch.stack([torch.randperm(s.ffn, generator=gen)[:nf].sort().values
                           for _ in range(s.n_layers)])          # [L, nf]
    attn_idx = torch.stack([torch.randperm(s.attn_width, generator=gen)[:na].sort().values
                            for _ in range(s.n_layers)])         # [L, na]
    t0 = time.perf_counter()
    sample = per_neuron_sample(arch, tokenizer, examples[0], ffn_idx, attn_idx)
    t_sample = time.perf_counter() - t0
    # Extrapolate: every example pays the fixed part plus one loop step per neuron of every layer.
    per_ffn = sample["t_ffn"] / ffn_idx.numel()
    per_attn = sample["t_attn"] / attn_idx.numel()
    t_per_neuron = len(examples) * (sample["t_fixed"] + s.n_layers * (s.ffn * per_ffn + s.attn_width * per_attn))

    # Checks: batched == per-example (summed), and per-neuron == per-example (example 0).
    rows = [(k, max_diff(batched.tensors()[k], per_example.tensors()[k]),
             batched.tensors()[k].abs().max().item()) for k in batched.tensors()]
    rows_neuron = [
        ("ffn (sampled)", max_diff(sample["ffn"], first.ffn.gather(1, ffn_idx)), first.ffn.abs().max().item()),
        ("attn (sampled)", max_diff(sample["attn"], first.attn.gather(1, attn_idx)), first.attn.abs().max().item()),
        ("layer_attn", max_diff(sample["layer_attn"], first.layer_attn), first.layer_attn.abs().max().item()),
        ("layer_ffn", max_diff(sample["layer_ffn"], first.layer_ffn), first.layer_ffn.abs().max().item())]

    n_neurons = s.n_layers * (s.ffn + s.attn_width)
    print()
    print(f"{'method':<42}{'seconds':>12}")
    print(f"{'batched attribute':<42}{t_batched:>12.1f}")
    print(f"{'per-example projection (measured)':<42}{t_per_example:>12.1f}")
    print(f"{'per-neuron loop (extrapolated)':<42}{t_per_neuron:>12.1f}")
    print(f"  per-neuron sample: example 0, {nf} FFN + {na} attention neurons x {s.n_layers} layers, "
          f"measured {t_sample:.1f}s")
    print(f"  = {per_ffn * 1e3:.2f} ms per FFN neuron, {per_attn * 1e3:.2f} ms per attention neuron, "
          f"{sample['t_fixed']:.2f}s fixed per example;")
    print(f"  extrapolated to {len(examples)} examples x {n_neurons} neurons "
          f"({len(examples) * n_neurons} log-softmax matvecs)")
    print()
    print("check: batched vs per-example projection (scores summed over examples)")
    print(f"  {'tensor':<16}{'max abs diff':>14}{'max abs score':>16}")
    for k, d, m in rows:
        print(f"  {k:<16}{d:>14.3e}{m:>16.3e}")
    print("check: sampled per-neuron loop vs per-example projection, example 0")
    print("  (batched == per-example above, so this also checks batched at these neurons)")
    print(f"  {'tensor':<16}{'max abs diff':>14}{'max abs score':>16}")
    for k, d, m in rows_neuron:
        print(f"  {k:<16}{d:>14.3e}{m:>16.3e}")
    print()
    print(f"speed-up batched vs per-neuron (extrapolated): {t_per_neuron / t_batched:8.1f}x  (target >= 10x)")
    print(f"speed-up batched vs per-example projection:    {t_per_example / t_batched:8.1f}x")


# --- score cache: cold vs warm ------------------------------------------------------------------
def cache_part(args, tokenizer, examples) -> None:
    model = llama_model(args)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as folder:
        cfg = config_from_dict({"source": {"model": "bench"}, "target": {"model": "bench"},
                                "attribution": {"batch_size": args.batch_size, "chunk_mb": args.chunk_mb,
                                                "cache": folder}})
        s = Arch(model).shape
        print(f"\nScore cache: the Llama (hidden {s.hidden}, FFN {s.ffn}, {s.n_layers} layers, vocab {s.vocab}, "
              f"fp32), one batch of {len(examples)} examples ...", flush=True)
        source = Source(cfg, model, tokenizer)
        cold = source.scores(examples)
        t_cold = source.take_seconds()
        warm = source.scores(examples)
        t_warm = source.take_seconds()
        fresh = Source(cfg, model, tokenizer)
        again = fresh.scores(examples)
        t_fresh = fresh.take_seconds()
        t0 = time.perf_counter()
        model_hash(model)
        t_hash = time.perf_counter() - t0
        file_bytes = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    same = all(torch.equal(a.tensors()[k], b.tensors()[k]) and torch.equal(a.tensors()[k], c.tensors()[k])
               for a, b, c in zip(cold, warm, again) for k in a.tensors())
    print(f"{'score cache':<42}{'seconds':>12}")
    print(f"{'cold (miss: hash + attribute + write)':<42}{t_cold:>12.3f}")
    print(f"{'warm (hit)':<42}{t_warm:>12.3f}")
    print(f"{'warm, fresh Source (hash + hit)':<42}{t_fresh:>12.3f}")
    print(f"  model hash alone: {t_hash:.3f}s for {n_bytes / 1e6:.0f} MB of weights; "
          f"cache file {file_bytes / 1e6:.2f} MB; hits {source.cache_hits + fresh.cache_hits}, "
          f"misses {source.cache_misses + fresh.cache_misses}; bit-identical: {same}")
    print(f"speed-up warm vs cold:                       {t_cold / t_warm:8.0f}x")
    print(f"speed-up warm fresh Source vs cold:          {t_cold / t_fresh:8.1f}x")


# --- Qwen-shaped peak memory --------------------------------------------------------------------
def qwen_worker(args) -> None:
    """In a fresh process: build the model, run attribute, print one JSON line of measurements."""
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    examples = read_examples(args.data, limit=args.qwen_examples)
    t0 = time.perf_counter()
    model = qwen_model()
    build_s = time.perf_counter() - t0
    build_peak = peak_rss_bytes()
    arch = Arch(model)
    n = args.qwen_layers or arch.shape.n_layers
    if n < arch.shape.n_layers:
        arch = first_layers(arch, n)
    before = rss_bytes()
    was_reset = reset_peak_rss()
    t0 = time.perf_counter()
    attribute(arch, tokenizer, examples, batch_size=args.batch_size, budget_bytes=args.chunk_mb << 20)
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(build_s=build_s, build_peak=build_peak, before=before, peak=peak_rss_bytes(),
                          reset=was_reset, seconds=seconds, layers=n, n_layers=model.config.num_hidden_layers,
                          params=sum(p.numel() for p in model.parameters()))))


PAPER_S_PER_EXAMPLE = 94.4  # the paper's code on the anchor shape (see the docstring)


def kernels_part(args) -> None:
    from laten_ray import attribution
    from laten_ray.attribution import attribute_each, neuron_scores
    model = random_llama(32000, 512, 1376, 6, 8)
    arch, tokenizer = Arch(model), build_tokenizer()
    examples = read_examples(args.data, limit=64)
    print(f"anchor shape: hidden 512, FFN 1376, 6 layers, 8 heads, vocab 32000, fp32, {torch.get_num_threads()} thread(s)")
    pairs = {"series": 0, "all": 0}
    series_scores = attribution._series_scores

    def counting(p, proj, a, w):  # the share of (example, neuron) pairs the series took
        got, usable = series_scores(p, proj, a, w)
        pairs["series"] += int(usable.sum())
        pairs["all"] += usable.numel()
        return got, usable
    attribution._series_scores = counting
    print(f"{'batch':>6} {'examples':>9} {'exact s/ex':>11} {'series s/ex':>12} {'speed-up':>9} "
          f"{'exact vs paper':>15} {'series vs paper':>16}")
    for batch, n in ((1, 2), (8, 8), (64, 64)):
        times = {}
        for kernel in ("exact", "series"):
            t0 = time.perf_counter()
            scores = attribute_each(arch, tokenizer, examples[:n], batch_size=batch, group=batch, kernel=kernel)
            times[kernel] = (time.perf_counter() - t0) / n
            if kernel == "exact":
                exact = scores
        diff = max(float((a.ffn - b.ffn).abs().max()) for a, b in zip(scores, exact))
        print(f"{batch:>6} {n:>9} {times['exact']:>11.2f} {times['series']:>12.2f} {times['exact'] / times['series']:>8.1f}x "
              f"{PAPER_S_PER_EXAMPLE / times['exact']:>14.0f}x {PAPER_S_PER_EXAMPLE / times['series']:>15.0f}x"
              f"   (largest FFN score difference: {diff:.1e})")
    attribution._series_scores = series_scores
    print(f"pairs scored by the series: {100 * pairs['series'] / max(pairs['all'], 1):.1f}% (the rest exactly)")
    # one layer in float64 as the reference both paths approximate
    torch.manual_seed(0)
    V, d, n, B = 32000, 512, 1376, 8
    unembed, vectors = torch.randn(V, d) * 0.05, torch.randn(d, n) * 0.05
    base, coef, r, w = torch.randn(B, d), torch.randn(B, n), torch.ones(B), torch.randint(0, V, (B,))
    z = (base.double() @ unembed.double().T) / r.double()[:, None]           # [B, V]
    alpha = coef.double() / r.double()[:, None]                              # [B, n]
    exact = torch.empty(B, n, dtype=torch.float64)
    for n0 in range(0, n, 64):                                               # float64 throughout
        proj = vectors.double()[:, n0:n0 + 64].T @ unembed.double().T        # [64, V]
        a = alpha[:, n0:n0 + 64, None]
        lse = torch.logsumexp(z[:, None, :] + a * proj[None], dim=-1)        # [B, 64]
        exact[:, n0:n0 + 64] = a[..., 0] * proj[:, w].T - (lse - torch.logsumexp(z, -1, keepdim=True))
    top = float(exact.abs().max())
    for kernel in ("exact", "series"):
        got = neuron_scores(unembed, vectors, base, coef, r, w, 256 << 20, series=kernel == "series")
        print(f"one random layer, {kernel}: largest error against float64 {float((got - exact).abs().max()):.1e} "
              f"(largest score {top:.2f})")


# One shape per family (laten_ray/families.yaml) at the anchor width, each with its family's own
# traits as its HF config has them by default (Gemma 2's final-logit soft cap of 30, post-norms,
# (1 + g) norms; Phi-3's fused projections; ...). model_type -> fields beyond the common shape.
FAMILY_SHAPES = {
    "llama": ("llama", {}),
    "llama3": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=64)),
    "gemma2": ("gemma2", dict(head_dim=64, tie_word_embeddings=True)),
    "gemma3": ("gemma3_text", dict(head_dim=64, tie_word_embeddings=True)),
    "phi3": ("phi3", dict(pad_token_id=0)),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", dict(tie_word_embeddings=True, pad_token_id=0)),
}


def families_part(args) -> None:
    """attribute_each on the anchor shape (hidden 512, FFN 1376, 6 layers, 8 heads, vocab 32000,
    fp32) built as each family, at batch 8: seconds per example and the ratio to the Llama-shaped
    run of the same width, side by side in this run."""
    from laten_ray.attribution import attribute_each
    tokenizer, examples = build_tokenizer(), read_examples(args.data, limit=args.family_examples)
    print(f"families at the anchor shape (hidden 512, FFN 1376, 6 layers, 8 heads, vocab 32000, fp32, "
          f"{torch.get_num_threads()} thread(s)), batch 8, {len(examples)} examples, kernel series")
    print(f"{'family':>9} {'model_type':>12} {'s/example':>10} {'vs llama':>9}  what differs")
    base = None
    for name, (model_type, fields) in FAMILY_SHAPES.items():
        cfg = AutoConfig.for_model(model_type, **{
            "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
            "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024,
            "tie_word_embeddings": False, **fields})
        torch.manual_seed(0)
        arch = Arch(AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False))
        attribute_each(arch, tokenizer, examples[:1])  # warm-up: first-call allocations
        t0 = time.perf_counter()
        attribute_each(arch, tokenizer, examples, batch_size=8, group=8)
        sec = (time.perf_counter() - t0) / len(examples)
        base = base or sec
        print(f"{name:>9} {model_type:>12} {sec:>10.2f} {sec / base:>8.2f}x  {arch.family.notes}", flush=True)


def qwen_part(args) -> None:
    print(f"\nQwen2.5-1.5B-shaped run (bf16 weights, random) in a fresh process: {args.qwen_examples} "
          f"example(s), chunk budget {args.chunk_mb} MB ...", flush=True)
    cmd = [sys.executable, os.path.abspath(__file__), "--qwen-worker",
           "--qwen-examples", str(args.qwen_examples), "--qwen-layers", str(args.qwen_layers),
           "--chunk-mb", str(args.chunk_mb), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--data", args.data]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    scale = r["n_layers"] / r["layers"]
    print(f"  parameters                                 {r['params'] / 1e9:.3f} B")
    print(f"  model build                                {r['build_s']:.1f}s, peak RSS {r['build_peak'] / GiB:.2f} GiB")
    print(f"  RSS before attribution                     {r['before'] / GiB:.2f} GiB")
    print(f"  peak RSS during attribution (ru_maxrss)    {r['peak'] / GiB:.2f} GiB"
          + ("" if r["reset"] else "  (could not reset the high-water mark: includes the build)"))
    print(f"  peak - before                              {(r['peak'] - r['before']) / GiB:.2f} GiB")
    print(f"  process peak (build or attribution)        {max(r['peak'], r['build_peak']) / GiB:.2f} GiB")
    if r["layers"] < r["n_layers"]:
        print(f"  attribute seconds, {r['layers']} of {r['n_layers']} layers scored "
              f"(forward through all)    {r['seconds']:.1f}s measured, "
              f"~{r['seconds'] * scale:.0f}s extrapolated linearly to all {r['n_layers']} layers")
    else:
        print(f"  attribute seconds                          {r['seconds']:.1f}s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--examples", type=int, default=20, help="examples for the Llama comparison")
    p.add_argument("--data", default="demo:align", help="data spec of the examples")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass in attribute")
    p.add_argument("--chunk-mb", type=int, default=256, help="attribution chunk budget")
    p.add_argument("--sample-ffn", type=int, default=128, help="FFN neurons per layer in the per-neuron sample")
    p.add_argument("--sample-attn", type=int, default=64, help="attention neurons per layer in the sample")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 were slower than 1 here)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--skip-qwen", action="store_true")
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--only-kernels", action="store_true", help="only the scoring kernels, series against exact")
    p.add_argument("--only-families", action="store_true", help="only one shape per family (minutes)")
    p.add_argument("--family-examples", type=int, default=8, help="examples per family in --only-families")
    p.add_argument("--qwen-examples", type=int, default=1)
    p.add_argument("--qwen-layers", type=int, default=2,
                   help="Qwen layers to score (0 = all 28); peak memory does not depend on it, "
                        "the time is extrapolated")
    p.add_argument("--qwen-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.qwen_worker:
        return qwen_worker(args)
    if args.only_kernels:
        return kernels_part(args)
    if args.only_families:
        return families_part(args)
    if not args.skip_llama:
        tokenizer = build_tokenizer()
        examples = read_examples(args.data, limit=args.examples)
        llama_part(args, tokenizer, examples)
    if not args.skip_cache:
        cache_part(args, build_tokenizer(), read_examples(args.data, limit=args.batch_size))
    if not args.skip_qwen:
        qwen_part(args)


if __name__ == "__main__":
    main()
