"""Data specs: the repository's data/ folder from any directory, folders written by
`Dataset.save_to_disk`, `hf:` specs through `datasets.load_dataset` (a local folder here: no
network), and the public column layouts of GSM8K, MMLU, HumanEval and MBPP."""
from __future__ import annotations

import json

import datasets
import pytest

from laten_ray.data import read_examples
from laten_ray.eval.tasks import get_task
from laten_ray.records import DataError, read_records, resolve_path

GSM = {"question": "Tom has 3 apples and buys 4. How many?",
       "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
MMLU = {"question": "2 + 2 =", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}
HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
             "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
             "entry_point": "add"}
MBPP_FULL = {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\r\n    return a + b",
             "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "", "challenge_test_list": []}
MBPP_SANITIZED = {"source_file": "x.py", "task_id": 12, "prompt": "Write a function to add two numbers.",
                  "code": "import math\ndef add(a, b):\n    return a + b", "test_imports": ["import math"],
                  "test_list": ["assert add(1, 2) == 3"]}


def saved(tmp_path, name: str, rows: list[dict]) -> str:
    folder = tmp_path / name
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return str(folder)


def test_data_paths_mean_the_repository_data_folder_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("data/eval/gsm8k_test.jsonl").is_file()
    assert len(read_examples("data/gsm/gsm_extract_split.jsonl")) == 20
    assert len(get_task("mmlu").load("data/eval/mmlu_dev.jsonl")) == 285
    with pytest.raises(DataError, match=r"data file 'data/nope\.jsonl' not found \(looked at .*/data/nope\.jsonl\)"):
        read_examples("data/nope.jsonl")


@pytest.mark.parametrize("task, row, gold", [("gsm8k", GSM, "7"), ("mmlu", MMLU, "B")])
def test_saved_public_layouts_become_items_and_training_examples(tmp_path, task, row, gold):
    spec = saved(tmp_path, task, [row, row])
    (item, _) = get_task(task).load(spec)
    assert item.gold == gold
    assert item.prompt == {"gsm8k": f"Answer the following question.\n\nQuestion: {GSM['question']}",
                           "mmlu": "The following are multiple choice questions (with answers) about elementary "
                                   "mathematics.\n\n2 + 2 =\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"}[task]
    (example, _) = read_examples(spec)
    user, answer = example.messages
    assert user["content"] == item.prompt  # trained on the prompt it is evaluated with
    assert answer["content"] == {"gsm8k": "Answer: He has 3 + 4 = 7 apples. So the answer is 7.",
                                 "mmlu": "The answer is: B"}[task]


def test_jsonl_and_saved_dataset_give_the_same_items(tmp_path):
    rows = [json.loads(line) for line in open(resolve_path("data/eval/gsm8k_test.jsonl"))][:5]
    from_file = get_task("gsm8k").load("data/eval/gsm8k_test.jsonl", limit=5)
    from_folder = get_task("gsm8k").load(saved(tmp_path, "gsm", rows))
    assert [(i.prompt, i.gold) for i in from_file] == [(i.prompt, i.gold) for i in from_folder]


def test_code_layouts_run_their_canonical_solution_in_the_sandbox(tmp_path):
    from laten_ray.eval.sandbox import Limits, run_programs
    he = get_task("humaneval").load(saved(tmp_path, "he", [HUMANEVAL]))[0]
    full = get_task("mbpp").load(saved(tmp_path, "full", [MBPP_FULL]))[0]
    sanitized = get_task("mbpp").load(saved(tmp_path, "san", [MBPP_SANITIZED]))[0]
    assert full.prompt.endswith("Write a function to add two numbers.\ndef add(a, b)")
    assert sanitized.prompt.endswith("Write a function to add two numbers.\ndef add(a, b)")
    assert sanitized.tests.startswith("import math\n")
    programs = [get_task("humaneval").program(HUMANEVAL["prompt"] + HUMANEVAL["canonical_solution"], he),
                get_task("mbpp").program(MBPP_FULL["code"], full),
                get_task("mbpp").program(MBPP_SANITIZED["code"], sanitized),
                get_task("mbpp").program("def add(a, b):\n    return a - b", full)]
    assert [o.passed for o in run_programs(programs, Limits(timeout_s=10.0))] == [True, True, True, False]


def test_dataset_dict_folder_needs_a_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([GSM]),
                          "test": datasets.Dataset.from_list([GSM, GSM])}).save_to_disk(str(folder))
    assert len(get_task("gsm8k").load(f"{folder}:test")) == 2
    with pytest.raises(DataError, match=r"has splits train, test; name one as .*dd:SPLIT"):
        get_task("gsm8k").load(str(folder))
    with pytest.raises(DataError, match=r"dd:dev: the saved dataset has splits train, test"):
        get_task("gsm8k").load(f"{folder}:dev")


def test_hf_spec_loads_with_the_datasets_library(tmp_path):
    """hf:NAME[:CONFIG]:SPLIT goes to datasets.load_dataset; a local folder of jsonl files
    stands in for a hub dataset here (the same code path, no network)."""
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [GSM] * 3))
    items = get_task("gsm8k").load(f"hf:{folder}:test")
    assert [i.gold for i in items] == ["7"] * 3
    assert [where for where, _ in read_records(f"hf:{folder}:test", limit=2)] == \
        [f"hf:{folder}:test row 0", f"hf:{folder}:test row 1"]
    with pytest.raises(DataError, match=r"expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
        read_examples("hf:openai/gsm8k")
    with pytest.raises(DataError, match=r"hf:.*:validation: datasets could not load it"):
        get_task("gsm8k").load(f"hf:{folder}:validation")


def test_a_record_of_no_known_layout_names_its_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: no 'messages' key, and not a GSM8K, MMLU, HumanEval or MBPP "
                                        r"record \(keys: prompt, completion\)"):
        read_examples(str(path))
    path.write_text(json.dumps({**MMLU, "answer": 7}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:1: expected 4 choices and an answer index 0-3"):
        read_examples(str(path))
