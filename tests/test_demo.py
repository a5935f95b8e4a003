"""The built-in demo: disjoint splits that share the facts, the shipped pair's hash check, a
source that knows the multiplication table and a target that does not (measured on held-out
sentences with the real evaluate()), the demo task's scoring, and a build script that
reproduces the shipped weights bit for bit."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from laten_ray.builtin import demo, tiny
from laten_ray.eval.evaluate import evaluate
from laten_ray.eval.tasks import Item, get_task
from laten_ray.models import load_tokenizer, resolve

REPO = Path(__file__).resolve().parents[1]


def questions(records) -> list[str]:
    return [r["messages"][0]["content"] for r in records]


def factors(text: str) -> tuple[int, int]:
    a, b = re.search(r"(\d+) \* (\d+)", text).groups()
    return int(a), int(b)


def test_splits_are_disjoint_sentences_that_share_the_facts():
    splits = {s: questions(demo.records(s)) for s in demo.SPLITS}
    assert {s: len(q) for s, q in splits.items()} == {"test": 200, "align": 64, "extract": 8, "train": 3000}
    seen: set[str] = set()
    for s, qs in splits.items():
        assert len(set(qs)) == len(qs) and not seen & set(qs), s  # no sentence twice, in or across splits
        seen |= set(qs)
    train_facts = {factors(r["messages"][1]["content"]) for r in demo.records("train")}
    assert train_facts == {(a, b) for a in range(2, 10) for b in range(2, 10)}  # the whole table
    for r in demo.records("test"):
        answer = r["messages"][1]["content"]
        a, b = factors(answer)
        assert answer.endswith(f"So the answer is {a * b}.") and f" {a} " in r["messages"][0]["content"]
    assert demo.records("test") == demo.records("test")  # generated the same every time


def test_the_shared_problems_hold_no_fact_of_the_table():
    shared = demo.shared_records()
    assert len(shared) == demo.SHARED
    assert not set(questions(shared)) & set(questions(demo.records("test")))
    for r in shared:
        a, b = factors(r["messages"][1]["content"])
        assert (a in (10, 100)) != (b in (10, 100)) and 2 <= min(a, b) <= 9


def test_demo_task_extracts_the_stated_number():
    task = get_task("demo")
    item = Item("x", "q", "56")
    cases = {"Answer: Ada buys 7 * 8 coins. So the answer is 56.": "56",
             "So the answer is 56. So the answer is 57.": "56",  # the first stated answer
             "The answer is: 1,056.": "1056",
             "7 * 8 is 54 or 56": "56",  # no 'answer is': the last number
             "Answer: Ada buys 7 * 8 coins. So the answer is": "8",
             "no number": None}
    for text, number in cases.items():
        assert task.extract(text, item) == number, text
    assert task.correct("56", item) and not task.correct("57", item) and not task.correct(None, item)
    golds = [factors(r["messages"][1]["content"]) for r in demo.records("extract")]
    assert [i.gold for i in task.load("demo:extract")] == [str(a * b) for a, b in golds]


def test_shipped_pair_resolves_to_the_checked_package_folders():
    for name in tiny.DEMO:
        folder = resolve(f"tiny:{name}")
        assert folder == tiny.WEIGHTS / name
        assert set(tiny.DEMO_SHA256[name]) == {p.name for p in folder.iterdir()}  # every file is checked
    assert tiny.tiny_config("demo-source").num_hidden_layers >= tiny.tiny_config("demo-target").num_hidden_layers
    # the random presets are built with the shipped tokenizer's vocabulary
    assert load_tokenizer("tiny:demo-target").get_vocab() == tiny.build_tokenizer().get_vocab()


def test_a_changed_or_missing_shipped_file_is_a_clear_error(tmp_path):
    copy = tmp_path / "demo-target"
    shutil.copytree(tiny.WEIGHTS / "demo-target", copy)
    expected = tiny.DEMO_SHA256["demo-target"]
    assert tiny.check_weights(copy, expected) == copy
    weights = copy / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped
    with pytest.raises(tiny.WeightsError) as e:
        tiny.check_weights(copy, expected)
    assert str(weights) in str(e.value) and expected["model.safetensors"] in str(e.value)
    assert tiny.sha256(weights) in str(e.value)
    weights.write_bytes(good)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(tiny.WeightsError, match=r"tokenizer\.json: missing"):
        tiny.check_weights(copy, expected)


def test_source_knows_the_table_and_target_does_not_on_held_out_sentences(tmp_path):
    """Exact match on demo:test, greedy, LaTen's chat format: the gap a transfer could close."""
    scores = {name: evaluate(f"tiny:{name}", "demo", "demo:test", tmp_path / name, {"engine": "hf"},
                             progress=False) for name in tiny.DEMO}
    assert {s["examples"] for s in scores.values()} == {200}
    assert scores["demo-source"]["value"] >= 0.8, scores["demo-source"]
    assert scores["demo-target"]["value"] <= 0.2, scores["demo-target"]
    for line in (tmp_path / "demo-target" / "examples.jsonl").read_text().splitlines():
        assert "So the answer is" in json.loads(line)["generations"][0]  # a well-formed answer, not noise


def test_laten_evaluate_runs_the_demo_task(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--model", "tiny:demo-source", "--task",
                           "demo", "--data", "demo:test", "--engine", "hf", "--limit", "10", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["examples"] == 10 and summary["sampling"]["max_tokens"] == 48
    assert f"demo: accuracy {summary['value']:.4f}" in done.stdout


@pytest.mark.slow  # about a minute: pre-trains the target
def test_build_script_reproduces_the_shipped_target_bit_for_bit(tmp_path):
    done = subprocess.run([sys.executable, "scripts/build_demo_models.py", "--only", "demo-target", "--no-eval",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "demo-target step 100/" in done.stdout  # progress while it trains
    built = {p.name: tiny.sha256(p) for p in (tmp_path / "demo-target").iterdir()}
    assert built == tiny.DEMO_SHA256["demo-target"]
    assert "sha256: the same as tiny.DEMO_SHA256" in done.stdout
