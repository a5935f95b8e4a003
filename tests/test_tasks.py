"""Scorers on hand-written cases; both input formats of every task; pass@k against known values."""
from __future__ import annotations

import json
import math
import re

import pytest

from laten_ray.data import DataError
from laten_ray.eval.sandbox import Limits, run_programs
from laten_ray.eval.tasks import (code_of, get_task, interval95, last_number, mmlu_letter,
                             normalize_number, pass_at_k)


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1234"),
    ("It costs -$5.50 in the end", "-5.5"),
    ("temperature drops to -3 degrees", "-3"),
    ("so 3.0 apples", "3"),
    ("first 12, then 7, finally 0.25", "0.25"),
    ("x = 10,000,000,", "10000000"),
    ("no numbers here", None),
])
def test_last_number(text, number):
    assert last_number(text) == number


def test_normalize_number_rejects_words():
    assert normalize_number("twelve") is None and normalize_number("1,5") == "15"


@pytest.mark.parametrize("text, letter", [
    ("The answer is: D", "D"), ("the answer is (b)", "B"), ("C. polydactyly", "C"),
    ("(A) because ...", "A"), ("B", "B"), ("I think it is D since D fits", "D"),
    ("A or B, hard to say", None), ("none of them", None),
])
def test_mmlu_letter(text, letter):
    assert mmlu_letter(text) == letter


def test_code_of_takes_the_first_block_or_everything():
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nmore") == "def f():\n    return 1\n"
    assert code_of("    return x + 1\n") == "    return x + 1\n"
    assert code_of("```\nprint(1)\n") == "print(1)\n"  # an unclosed block (cut by max_tokens)


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 0, 3, 0.0), (5, 4, 2, 1.0),
    (10, 2, 5, 1 - math.comb(8, 5) / math.comb(10, 5)),   # 7/9
    (200, 13, 10, 1 - math.comb(187, 10) / math.comb(200, 10)),
])
def test_pass_at_k_matches_the_closed_form(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def test_pass_at_k_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)


def test_interval95():
    lo, hi = interval95([1] * 8 + [0] * 2)
    assert lo < 0.8 < hi and lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert interval95([1, 1, 1]) [1] == 1.0
    lo, hi = interval95([0.5, 0.7, 0.9])
    assert lo < 0.7 < hi


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gsm8k_both_formats_and_scoring(tmp_path):
    task = get_task("gsm8k")
    public = task.load(write(tmp_path / "p.jsonl", [{"id": 7, "question": "2+2?", "answer": "2+2=4\n#### 4"},
                                                    {"question": "Big?", "answer": "#### 1,200"}]))
    assert public[0].prompt == "Answer the following question.\n\nQuestion: 2+2?" and public[0].gold == "4"
    assert public[1].gold == "1200"
    paper = task.load(write(tmp_path / "m.jsonl", [{"id": "gsm_1", "messages": [
        {"role": "user", "content": "Answer the following question.\n\nQuestion: 2+2?"},
        {"role": "assistant", "content": "Answer: 2 + 2 = 4. The answer is 4"}]}]))
    assert paper[0].gold == "4" and paper[0].prompt == public[0].prompt
    assert task.correct(task.extract("so we get 4.", public[0]), public[0])
    assert not task.correct(task.extract("so we get 5.", public[0]), public[0])
    assert task.correct(task.extract("That is 1,200 dollars", public[1]), public[1])
    assert not task.correct(task.extract("no idea", public[1]), public[1])


def test_mmlu_both_formats(tmp_path):
    task = get_task("mmlu")
    [item] = task.load(write(tmp_path / "p.jsonl", [{"subject": "medical_genetics", "question": "Extra digit?",
                                                      "choices": ["a", "b", "c", "d"], "answer": 3}]))
    assert item.prompt == ("The following are multiple choice questions (with answers) about medical genetics."
                           "\n\nExtra digit?\nA. a\nB. b\nC. c\nD. d\nAnswer:") and item.gold == "D"
    [paper] = task.load(write(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": item.prompt}, {"role": "assistant", "content": "The answer is: D"}]}]))
    assert paper.gold == "D" and task.correct(task.extract(" D. d", paper), paper)


def test_code_tasks_build_programs_that_pass_or_fail_in_the_sandbox(tmp_path):
    he = get_task("humaneval")
    [h] = he.load(write(tmp_path / "h.jsonl", [{
        "task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}]))
    mb = get_task("mbpp")
    [m] = mb.load(write(tmp_path / "m.jsonl", [{
        "task_id": 11, "text": "Write a function to double x.", "code": "def double(x):\r\n  return 2 * x",
        "test_list": ["assert double(2) == 4", "assert double(0) == 0"]}]))
    assert m.prompt == "Complete the following python function.\n\n\nWrite a function to double x.\ndef double(x)"
    programs = [he.program(he.extract("    return a + b\n", h), h),                      # body completion
                he.program(he.extract("```python\ndef add(a, b):\n    return a - b\n```", h), h),
                mb.program(mb.extract("```python\ndef double(x):\n    return x + x\n```", m), m),
                mb.program(mb.extract("def double(x):\n    return x", m), m)]
    outcomes = run_programs(programs, Limits(timeout_s=5))
    assert [o.passed for o in outcomes] == [True, False, True, False]


@pytest.mark.parametrize("task, row, message", [
    ("gsm8k", {"question": "q"}, "missing key(s) answer"),
    ("gsm8k", {"question": "q", "answer": "4"}, "no '#### N'"),
    ("mmlu", {"subject": "x", "question": "q", "choices": ["a"], "answer": 0}, "4 choices"),
    ("humaneval", {"messages": [{"role": "user", "content": "write code"}]}, "needs its tests"),
    ("mbpp", {"task_id": 1, "text": "t"}, "missing key(s) code, test_list"),
])
def test_bad_rows_name_file_line_and_key(tmp_path, task, row, message):
    path = write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=rf"bad.jsonl:1.*{re.escape(message)}"):
        get_task(task).load(path)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'gsm'"):
        get_task("gsm")
