"""Build the shipped demo pair, `tiny:demo-source` and `tiny:demo-target`, bit for bit.

    python scripts/build_demo_models.py [--out DIR] [--only demo-target] [--no-eval]

Each model starts from its config (laten_ray/builtin/tiny.py DEMO) with a fixed seed and is
pre-trained on one thread with a fixed data order (laten_ray/builtin/demo.py):
- demo-target: the shared problems only (the task's templates with a factor 10 or 100): it
  learns the question and answer format, not the table 2..9 x 2..9;
- demo-source: the shared problems and demo:train: it also learns the table.
Then both are scored on demo:test (held-out sentences) with `laten evaluate`'s code, and the
sha256 of every written file is printed and compared with tiny.DEMO_SHA256 (paste them there
after a deliberate change). The default --out is the package's weights folder. About 5 minutes
on one CPU thread (the target 1, the source 3.5, the scores seconds).

The files are the same bit for bit on every run with the same torch and transformers versions
on the same kind of CPU: build twice into two --out folders and compare `sha256sum */*`, or run
`pytest -m slow tests/test_demo.py`, which rebuilds the target and compares it with the
recorded sums.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from laten_ray.builtin import demo, tiny  # noqa: E402
from laten_ray.data import Example, lm_batch  # noqa: E402

# name -> (data, optimizer steps, peak lr); batches of BATCH examples, answer tokens only
RECIPES = {"demo-target": ("shared", 600, 3e-3), "demo-source": ("shared+train", 800, 3e-3)}
BATCH = 32
WARMUP = 50
SEED = 0


def examples(data: str) -> list[Example]:
    records = demo.shared_records() + (demo.records("train") if "train" in data else [])
    return [Example(tuple(r["messages"]), r["id"]) for r in records]


def order(n: int, steps: int, g: torch.Generator) -> list[list[int]]:
    """Batch indices: whole shuffled passes over the n examples, cut into batches."""
    flat: list[int] = []
    while len(flat) < steps * BATCH:
        flat += torch.randperm(n, generator=g).tolist()
    return [flat[i * BATCH:(i + 1) * BATCH] for i in range(steps)]


def pretrain(model, tokenizer, data: list[Example], steps: int, lr: float, name: str) -> None:
    """AdamW, linear warmup then cosine decay to 0; a progress line every 100 steps."""
    g = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP)
                                                 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t0, total = time.perf_counter(), 0.0
    for step, picks in enumerate(order(len(data), steps, g), start=1):
        loss = model(**lm_batch(tokenizer, [data[i] for i in picks], 128)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        if step % 100 == 0 or step == steps:
            print(f"{name} step {step}/{steps}  loss {total / (100 if step % 100 == 0 else step % 100):.4f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            total = 0.0
    model.eval()


def build(name: str, out: Path) -> Path:
    """Pre-train `name` and write it to out/name (replaced whole once written)."""
    from transformers import AutoModelForCausalLM
    data, steps, lr = RECIPES[name]
    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(tiny.config_of(tiny.DEMO[name]))
    pretrain(model, tokenizer, examples(data), steps, lr, name)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for path in [tmp, *tmp.iterdir()]:  # the modes an ordinary write gets (mkdtemp's are private)
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    final = out / name
    if final.exists():
        old = final.rename(out / f".{name}-old")
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def sums(folder: Path) -> dict[str, str]:
    return {p.name: tiny.sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=tiny.WEIGHTS, help="default: the package's weights folder")
    p.add_argument("--only", choices=list(RECIPES), default=None, help="build one model only")
    p.add_argument("--no-eval", action="store_true", help="skip the demo:test scores")
    args = p.parse_args()
    torch.set_num_threads(1)  # one thread: the same float sums on every run
    t0 = time.perf_counter()
    names = [args.only] if args.only else list(RECIPES)
    folders = {name: build(name, args.out) for name in names}
    same = True
    for name, folder in folders.items():
        got = sums(folder)
        same &= got == tiny.DEMO_SHA256[name]
        print(f'    "{name}": {{' + "".join(f'\n        "{f}": "{h}",' for f, h in got.items()) + "\n    },")
    print("sha256: " + ("the same as tiny.DEMO_SHA256" if same else "NOT the recorded tiny.DEMO_SHA256"), flush=True)
    if not args.no_eval:
        from laten_ray.eval.evaluate import evaluate
        with tempfile.TemporaryDirectory() as scratch:
            for name, folder in folders.items():
                s = evaluate(str(folder), "demo", "demo:test", Path(scratch) / name, {"engine": "hf"}, progress=False)
                print(f"{name}: exact match {s['value']:.3f} on {s['examples']} demo:test questions", flush=True)
    print(f"done in {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
