"""Built-in demo task: multiplication word problems in the paper's chat `messages` format.

The task's knowledge is the multiplication table of 2..9 x 2..9 (64 facts). A question is a
sentence made of a template, a name, a thing and one fact, e.g. "Ada buys 7 boxes with 8 coins
in each box. How many coins does Ada buy?"; its answer restates the product and ends in the
fact: "Answer: Ada buys 7 * 8 coins. So the answer is 56."

Splits (`demo:SPLIT`): every sentence of the task is enumerated, shuffled once with a fixed seed
and cut into test (200), align (64), extract (8) and train (3000), so no sentence is in two
splits. What the splits share is the facts: each of the 64 facts is asked in train many times,
and test asks the same facts in sentences that never appear in train, align or extract.

`shared_records()` are the same templates with the other factor 10 or 100 (7 * 10 = 70): the
answer format and two trivial rules without the table. The demo target is pre-trained on them
only, the demo source on them and demo:train (scripts/build_demo_models.py).

Generated from fixed seeds, so a fresh machine gets the same files without any download.
"""
from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from ..checkpoint import save_text

SPLITS = {"test": 200, "align": 64, "extract": 8, "train": 3000}  # examples per split, cut in this order
SHARED = 1000  # shared-format examples
FACTORS = range(2, 10)  # the table's factors
SHARED_FACTORS = (10, 100)  # the shared problems' other factor
_NAMES = ["Ada", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Joy", "Kofi", "Lena"]
_THINGS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "eggs", "cups"]
# (question, the answer's restatement) with {n} name, {t} thing, {a} groups, {b} per group; each
# names all four, so different choices never make the same sentence
_TEMPLATES = [
    ("{n} buys {a} boxes with {b} {t} in each box. How many {t} does {n} buy?", "{n} buys {a} * {b} {t}."),
    ("{n} has {a} bags, and each bag holds {b} {t}. How many {t} does {n} have?", "{n} has {a} * {b} {t}."),
    ("{n} lays out {a} rows of {t} with {b} {t} in each row. How many {t} does {n} lay out?",
     "{n} lays out {a} * {b} {t}."),
    ("{n} gives {b} {t} to each of {a} friends. How many {t} does {n} give away?", "{n} gives away {a} * {b} {t}."),
]


def _record(combo: tuple, rid: str) -> dict:
    (question, work), name, thing, a, b = combo
    fill = dict(n=name, t=thing, a=a, b=b)
    return {"dataset": "demo", "id": rid, "messages": [
        {"role": "user", "content": f"Answer the following question.\n\nQuestion: {question.format(**fill)}"},
        {"role": "assistant", "content": f"Answer: {work.format(**fill)} So the answer is {a * b}."}]}


def _shuffled(pairs: list[tuple[int, int]], seed: str) -> list[tuple]:
    """Every (template, name, thing, a, b) over these factor pairs, in a fixed shuffled order."""
    combos = [(tp, n, t, a, b) for tp in _TEMPLATES for n in _NAMES for t in _THINGS for a, b in pairs]
    random.Random(seed).shuffle(combos)
    return combos


@functools.cache
def _cuts() -> dict[str, list[tuple]]:
    combos = _shuffled([(a, b) for a in FACTORS for b in FACTORS], "laten-demo")
    out, start = {}, 0
    for split, n in SPLITS.items():
        out[split], start = combos[start:start + n], start + n
    return out


def records(split: str) -> list[dict]:
    """The records of one split (disjoint sentences; see the module docstring)."""
    return [_record(c, f"demo_{split}_{i}") for i, c in enumerate(_cuts()[split])]


def shared_records() -> list[dict]:
    """The task's templates with one factor 10 or 100 and the other 2..9: the answer format
    without the table (what both demo models are pre-trained on)."""
    pairs = [p for x in FACTORS for y in SHARED_FACTORS for p in ((x, y), (y, x))]
    return [_record(c, f"demo_shared_{i}") for i, c in enumerate(_shuffled(pairs, "laten-demo-shared")[:SHARED])]


def write_split(split: str, folder: Path) -> Path:
    """Write one split as jsonl (atomically, and again where an older version of the task left a
    different file) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"demo_{split}.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in records(split))
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        save_text(text, path)
    return path


def corpus() -> list[str]:
    """The texts the tiny tokenizer is trained on: train and the shared problems (test is not
    needed: its words are all in train)."""
    return [m["content"] for r in records("train") + shared_records() for m in r["messages"]]
