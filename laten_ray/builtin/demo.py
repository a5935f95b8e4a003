"""Built-in demo task: small arithmetic word problems in the paper's chat `messages` format.

Generated from a fixed seed, so a fresh machine gets the same files without any download.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SPLITS = {"train": 400, "align": 64, "extract": 8}  # examples per split
_NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Joy"]
_THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str]:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        work, result = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a = a + b
        q = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        work, result = f"{a} - {b} = {a - b}", a - b
    else:
        a, b = a % 9 + 2, b % 12 + 2
        q = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} is that?"
        work, result = f"{a} * {b} = {a * b}", a * b
    return (f"Answer the following question.\n\nQuestion: {q}",
            f"Answer: {name} has {work} {thing}. So the answer is {result}.")


def records(split: str) -> list[dict]:
    """The records of one split; each split has its own seed so the splits differ."""
    rng = random.Random(f"laten-demo-{split}")
    out = []
    for i in range(SPLITS[split]):
        question, answer = _problem(rng)
        out.append({"dataset": "demo", "id": f"demo_{split}_{i}", "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    return out


def write_split(split: str, folder: Path) -> Path:
    """Write one split as jsonl (atomically) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"demo_{split}.jsonl"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{random.randrange(1 << 30)}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records(split)), encoding="utf-8")
        tmp.replace(path)
    return path


def corpus() -> list[str]:
    """Every demo text, for training the tiny tokenizer."""
    return [m["content"] for split in SPLITS for r in records(split) for m in r["messages"]]
