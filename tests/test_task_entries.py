"""A task is one entry (laten_ray/eval/tasks.py): every registered task declares every fact the
evaluator reads, an incomplete entry is refused naming what it lacks, and a new task written
here, with its data in tmp_path, loads, prompts, generates and scores through the evaluator's
own functions without a change to any other module."""
from __future__ import annotations

import json
import re

import pytest

from laten_ray.eval import protocol as proto
from laten_ray.eval import tasks
from laten_ray.eval.evaluate import evaluate, sampling_for, score, score_chunk, summarize
from laten_ray.eval.sandbox import Limits
from laten_ray.eval.tasks import TASKS, Item, Task, get_task, missing_facts, register
from laten_ray.records import check_spec

MODEL = "tiny:demo-source"


@pytest.mark.parametrize("name", list(TASKS))
def test_every_registered_task_declares_every_fact(name):
    task = TASKS[name]
    assert task.name == name
    assert missing_facts(task) == [], f"task {name!r} does not declare: {', '.join(missing_facts(task))}"
    for fact in ("test_data", "dev_data"):  # the data it names exists (or is a known demo split)
        if getattr(task, fact):
            check_spec(getattr(task, fact))
    assert task.max_tokens >= 1 and task.metric in ("accuracy", "pass@1")
    assert task.modes[0] == proto.default_protocol(name, {}).mode  # the first mode is the default


def test_an_incomplete_entry_is_refused_naming_the_task_and_each_missing_fact():
    class Half(Task):
        name = "half"
        modes = ("choice", "generate")
        max_shots = 3

    with pytest.raises(ValueError, match=re.escape(
            "task 'half' does not declare: test_data, max_tokens, plain_stops, metric, from_public(), "
            "from_messages(), extract(), choices (choice mode compares them), dev_data or shot_pool() "
            "(where its shots come from), user_text() (how shots go in front of the question)")):
        register(Half())
    assert "half" not in TASKS


class Parity(Task):
    """Is N even or odd? The whole task: both modes, shots from a dev split, its own plain stop."""
    name = "parity"
    test_data = "set per test"   # data specs; the test points them at tmp_path
    dev_data = "set per test"
    max_tokens = 4
    plain_stops = ("\n",)
    metric = "accuracy"
    modes = ("generate", "choice")
    choices = ("even", "odd")
    choice_prefix = "It is"
    max_shots = 2

    def from_public(self, r: dict, where: str) -> Item:
        return Item(str(r["n"]), f"Is {r['n']} even or odd?", r["parity"])

    def from_messages(self, r: dict, where: str) -> Item:
        return Item(str(r["id"]), r["messages"][0]["content"], r["messages"][1]["content"])

    def extract(self, generation: str, item: Item) -> str | None:
        found = re.search(r"\b(even|odd)\b", generation.lower())
        return found.group(1) if found else None

    def user_text(self, item: Item, shots: list) -> str:
        return "".join(f"{s.prompt} {s.gold}\n" for s in shots) + item.prompt


class ChatTemplate:
    """A tokenizer's chat template, all `model` format needs of one."""
    chat_template = "[user] ... [assistant]"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"[user] {messages[0]['content']} [assistant] "


@pytest.fixture
def parity(tmp_path, monkeypatch):
    """The Parity entry registered (for this test only), with a test and a dev file."""
    monkeypatch.setattr(tasks, "TASKS", dict(TASKS))
    task = Parity()
    task.test_data = str(tmp_path / "test.jsonl")
    task.dev_data = str(tmp_path / "dev.jsonl")
    rows = lambda ns: "".join(json.dumps({"n": n, "parity": "odd" if n % 2 else "even"}) + "\n" for n in ns)
    (tmp_path / "test.jsonl").write_text(rows([7, 10, 13]))
    (tmp_path / "dev.jsonl").write_text(rows([2, 5]))
    return register(task)


def test_one_new_entry_is_loadable_promptable_and_scorable(parity, tmp_path):
    task = get_task("parity")
    items = task.load(task.test_data)
    assert (items[0].id, items[0].prompt, items[0].gold) == ("7", "Is 7 even or odd?", "odd")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "m", "messages": [
        {"role": "user", "content": "Is 4 even or odd?"}, {"role": "assistant", "content": "even"}]}) + "\n")
    [paper] = task.load(str(tmp_path / "m.jsonl"))  # the paper's chat format too
    assert (paper.id, paper.prompt, paper.gold) == ("m", "Is 4 even or odd?", "even")
    # the protocol reads its modes and shots
    assert proto.default_protocol("parity", {}).mode == "generate"
    with pytest.raises(ValueError, match=r"shots: parity takes 0 to 2 shots, got 3"):
        proto.default_protocol("parity", {"shots": 3})
    # one prompt per format, with a shot from the dev split, and in choice mode what precedes the answer
    shot = task.shot_pool(None)[""][:1]
    user = proto.user_text("parity", items[0], shot)
    assert user == "Is 2 even or odd? even\nIs 7 even or odd?"
    assert proto.render(user, "plain", None, "parity", True) == user
    assert proto.render(user, "laten", None, "parity", False) == f"<|user|>\n{user}\n\n<|assistant|>\n"
    assert proto.render(user, "model", ChatTemplate(), "parity", True) == f"[user] {user} [assistant] It is"
    assert proto.choices("parity") == [" even", " odd"]
    s = sampling_for("parity", {}, "plain")
    assert s.max_tokens == 4 and s.stop == ["\n"] and proto.stops("parity", "laten") == proto.TURN_STOPS
    # scored as the evaluator scores a chunk, and summarized with its metric
    records = score_chunk(task, items, [["odd"], ["It is odd."], ["odd, I think"]], Limits(), None)
    assert [r["correct"] for r in records] == [[True], [False], [True]]
    assert summarize("parity", records, [1])["metric"] == "accuracy"
    # completions made elsewhere, through `laten score`'s function
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"task_id": n, "completion": c}) + "\n"
                                                    for n, c in (("7", "odd"), ("10", "odd"))))
    scored = score("parity", task.test_data, str(tmp_path / "samples.jsonl"), tmp_path / "scored")
    assert scored["task"] == "parity" and scored["examples"] == 2 and scored["value"] == 0.5


@pytest.mark.parametrize("mode", ["generate", "choice"])
def test_one_new_entry_runs_through_evaluate(parity, tmp_path, mode):
    """The whole evaluation on a tiny model: its shots, its plain stop, its choices, its dev file."""
    summary = evaluate(MODEL, "parity", parity.test_data, tmp_path / mode, {
        "engine": "hf", "chat_format": "plain", "shots": 1, "mode": mode}, progress=False)
    records = [json.loads(line) for line in (tmp_path / mode / "examples.jsonl").read_text().splitlines()]
    assert [r["input"] for r in records] == [f"Is 2 even or odd? even\nIs {n} even or odd?" for n in (7, 10, 13)]
    assert summary["protocol"] == {"format": "plain", "shots": 1, "mode": mode, "dev": parity.dev_data}
    assert summary["metric"] == "accuracy" and summary["examples"] == 3
    if mode == "choice":
        assert all(r["extracted"][0] in ("even", "odd") and len(r["loglikelihoods"]) == 2 for r in records)
    else:
        assert summary["sampling"]["stop"] == ["\n"] and summary["sampling"]["max_tokens"] == 4
