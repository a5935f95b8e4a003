"""Evaluation tasks (docs/method.md §8): GSM8K, MMLU, HumanEval, MBPP, and the built-in demo
task (exact match of the stated number). Each reads the public
layouts and the paper's chat `messages` format from any data spec, builds the 0-shot prompt of
the paper's data (formats.py), extracts the answer from a generation and scores it (code tasks:
the program that `program` builds runs in the sandbox). Scores of every example feed
`summarize`: the metric and its 95% interval.
"""
from __future__ import annotations

import ast
import builtins
import keyword
import math
import re
from dataclasses import dataclass, field

from ..formats import (CODE_PROMPT, LETTERS, LayoutError, gsm8k_final, gsm8k_prompt, mbpp_full,
                       mbpp_signature, mmlu_block, mmlu_header)
from ..records import DataError, read_records
from .sandbox import Program

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass
class Item:
    id: str
    prompt: str                # the user message
    gold: str = ""             # gsm8k: the number; mmlu: the letter; code: unused
    tests: str = ""            # code: the test program (the judge's test process runs it)
    code_prefix: str = ""      # humaneval: the function header the model completes
    entry_point: str = ""      # code: the function under test
    helpers: str = ""          # code: the item's own code its tests may use (trusted): the prompt's
                               # helper functions, the reference's classes
    extra: dict = field(default_factory=dict)


def _need(record: dict, keys: tuple, where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)} (have: {', '.join(record)})")


def _messages(record: dict, where: str) -> tuple[str, str]:
    """(user text, assistant text) of a paper-format record."""
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
        raise DataError(f"{where}: `messages` must be a list of {{role, content}}")
    user = next((m["content"] for m in msgs if m.get("role") == "user"), None)
    if user is None:
        raise DataError(f"{where}: no user message")
    answer = next((m["content"] for m in reversed(msgs) if m.get("role") == "assistant"), "")
    return user, answer


# --- answers ---------------------------------------------------------------------------------

def normalize_number(text: str) -> str | None:
    """'1,234' -> '1234', '-$5.50' -> '-5.5', '3.' -> '3'; None if it is not a number."""
    t = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        value = float(t)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def last_number(text: str) -> str | None:
    """The last number in a text, normalized."""
    for match in reversed(_NUMBER.findall(text)):
        number = normalize_number(match)
        if number is not None:
            return number
    return None


def stated_answer(text: str) -> str | None:
    """The number after the first 'the answer is', else the last number in the text."""
    m = re.search(r"answer is\s*:?\s*(" + _NUMBER.pattern + ")", text, re.IGNORECASE)
    number = normalize_number(m.group(1)) if m else None
    return number if number is not None else last_number(text)


def mmlu_letter(text: str) -> str | None:
    """The chosen letter: after 'answer is', else a leading 'B.' / '(B)' / 'B', else the only
    standalone A-D letter in the text."""
    m = re.search(r"answer is\s*:?\s*\(?([ABCD])\b", text, re.IGNORECASE)
    if m:
        return m.group(1).upper()
    m = re.match(r"\s*\(?([ABCD])(?:[).:]|\s*$)", text)
    if m:
        return m.group(1)
    found = set(re.findall(r"\b([ABCD])\b", text))
    return found.pop() if len(found) == 1 else None


def code_of(generation: str) -> str:
    """The code in a generation: the first ```python (or ```) block, else the whole text."""
    m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", generation, re.DOTALL)
    return m.group(1) if m else generation


# --- tasks -----------------------------------------------------------------------------------

class Task:
    name = ""
    code = False

    def load(self, spec: str, limit: int | None = None) -> list[Item]:
        """The items of a data spec (laten_ray/records.py: a file, data/..., a saved dataset, hf:...)."""
        items = []
        for where, record in read_records(spec, limit):
            try:
                items.append(self.from_messages(record, where) if "messages" in record
                             else self.from_public(record, where))
            except LayoutError as e:
                raise DataError(f"{where}: {e}") from None
        if not items:
            raise DataError(f"{spec}: no examples")
        return items

    def extract(self, generation: str, item: Item) -> str | None:
        raise NotImplementedError

    def correct(self, extracted: str | None, item: Item) -> bool:
        return extracted is not None and extracted == item.gold


class GSM8K(Task):
    name = "gsm8k"

    def from_public(self, r: dict, where: str) -> Item:
        _need(r, ("question", "answer"), where)
        gold = normalize_number(gsm8k_final(r["answer"]))
        if gold is None:
            raise DataError(f"{where}: the answer after '####' is not a number")
        return Item(str(r.get("id", where)), gsm8k_prompt(r["question"]), gold, extra={"question": r["question"]})

    def from_messages(self, r: dict, where: str) -> Item:
        user, answer = _messages(r, where)
        gold = last_number(answer.rsplit("####", 1)[-1])
        if gold is None:
            raise DataError(f"{where}: the assistant answer holds no number")
        question = user.split("Question: ", 1)[1] if "Question: " in user else user
        return Item(str(r.get("id", where)), user, gold, extra={"question": question})

    def extract(self, generation: str, item: Item) -> str | None:
        return last_number(generation)


class Demo(Task):
    """The built-in demo task (laten_ray/builtin/demo.py): exact match of the stated number."""
    name = "demo"

    def from_public(self, r: dict, where: str) -> Item:
        raise DataError(f"{where}: a demo record needs chat `messages` (have: {', '.join(r)})")

    def from_messages(self, r: dict, where: str) -> Item:
        user, answer = _messages(r, where)
        gold = stated_answer(answer)
        if gold is None:
            raise DataError(f"{where}: the assistant answer holds no number")
        return Item(str(r.get("id", where)), user, gold)

    def extract(self, generation: str, item: Item) -> str | None:
        return stated_answer(generation)


class MMLU(Task):
    name = "mmlu"

    def from_public(self, r: dict, where: str) -> Item:
        _need(r, ("subject", "question", "choices", "answer"), where)
        if len(r["choices"]) != 4 or r["answer"] not in range(4):
            raise DataError(f"{where}: expected 4 choices and an answer index 0-3")
        block = mmlu_block(r["question"], r["choices"])
        return Item(str(r.get("id", where)), mmlu_header(r["subject"]) + block, LETTERS[r["answer"]],
                    extra={"subject": r["subject"], "block": block})

    def from_messages(self, r: dict, where: str) -> Item:
        user, answer = _messages(r, where)
        gold = mmlu_letter(answer)
        if gold is None:
            raise DataError(f"{where}: the assistant answer names no letter A-D")
        subject = r.get("category", "")
        block = user.split("\n\n", 1)[1] if user.startswith("The following are") else user
        return Item(str(r.get("id", where)), user, gold, extra={"subject": subject, "block": block})

    def extract(self, generation: str, item: Item) -> str | None:
        return mmlu_letter(generation)


class HumanEval(Task):
    name = "humaneval"
    code = True

    def from_public(self, r: dict, where: str) -> Item:
        _need(r, ("task_id", "prompt", "test", "entry_point"), where)
        return Item(r["task_id"], CODE_PROMPT + r["prompt"],
                    tests=f"{r['test']}\n\ncheck({r['entry_point']})\n", code_prefix=r["prompt"],
                    entry_point=r["entry_point"], helpers=r["prompt"])

    def from_messages(self, r: dict, where: str) -> Item:
        user, _ = _messages(r, where)
        _need(r, ("test", "entry_point"), f"{where} (a code example needs its tests)")
        return Item(str(r.get("task_id", r.get("id", where))), user,
                    tests=f"{r['test']}\n\ncheck({r['entry_point']})\n", code_prefix=r.get("prompt", ""),
                    entry_point=r["entry_point"], helpers=r.get("prompt", ""))

    def extract(self, generation: str, item: Item) -> str:
        code = code_of(generation)
        if item.entry_point and re.search(rf"def\s+{re.escape(item.entry_point)}\s*\(", code):
            return code
        return item.code_prefix + code  # a completion of the function body

    def program(self, solution: str, item: Item) -> Program:
        """What the sandbox's judge runs: the solution in one process; the item's helpers and its
        tests in the other, calling the function under test (first), and the other names the
        tests call that the helpers do not define, over the channel."""
        return Program(solution, item.tests, tuple(dict.fromkeys(
            [item.entry_point, *called_names(item.tests)] if item.entry_point else called_names(item.tests))),
            item.helpers)


class MBPP(HumanEval):
    name = "mbpp"

    def from_public(self, r: dict, where: str) -> Item:
        r = mbpp_full(r)  # the sanitized layout too
        _need(r, ("task_id", "text", "code", "test_list"), where)
        signature = mbpp_signature(r["code"])
        tests = "\n".join([r.get("test_setup_code", ""), *r["test_list"]]) + "\n"
        defined = re.findall(r"^\s*def\s+(\w+)", r["code"], re.MULTILINE)
        # the reference's function the tests call, whatever its name (`check`, a builtin's: `sum`)
        tested = [n for n in called_names("\n".join(r["test_list"]), keep=defined) if n in defined]
        return Item(str(r["task_id"]), f"{CODE_PROMPT}{r['text']}\n{signature}",
                    tests=tests, entry_point=tested[0] if tested else "", helpers=reference_classes(r["code"]))

    def from_messages(self, r: dict, where: str) -> Item:
        user, _ = _messages(r, where)
        _need(r, ("test_list",), f"{where} (a code example needs its tests)")
        return Item(str(r.get("task_id", r.get("id", where))), user, tests="\n".join(r["test_list"]) + "\n")

    def extract(self, generation: str, item: Item) -> str:
        return code_of(generation)


def reference_classes(code: str) -> str:
    """The classes a reference solution defines, with its imports: what MBPP's tests build their
    arguments from (a `Node` tree), as trusted code for the judge's test process."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return ""
    kept = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.ClassDef))]
    return "\n".join(ast.get_source_segment(code, n) for n in kept) + ("\n" if kept else "")


def called_names(code: str, keep=()) -> list[str]:
    """Names the code calls as plain functions (not methods, builtins or keywords, unless in
    `keep`), in order."""
    names = re.findall(r"(?<![\w.])([A-Za-z_]\w*)\s*\(", code)
    skip = (set(dir(builtins)) | set(keyword.kwlist) | {"check"}) - set(keep)
    return list(dict.fromkeys(n for n in names if n not in skip))


TASKS = {t.name: t for t in (GSM8K(), MMLU(), HumanEval(), MBPP(), Demo())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (have: {', '.join(TASKS)})")
    return TASKS[name]


# --- metrics ---------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def interval95(scores: list[float]) -> tuple[float, float]:
    """95% interval of a mean: Wilson for 0/1 scores, normal approximation otherwise."""
    n = len(scores)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(scores) / n
    z = 1.959964
    if all(s in (0, 1) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return (max(0.0, centre - half), min(1.0, centre + half))
    var = sum((s - mean) ** 2 for s in scores) / max(1, n - 1)
    half = z * math.sqrt(var / n)
    return (max(0.0, mean - half), min(1.0, mean + half))
