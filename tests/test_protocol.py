"""Evaluation protocols: MMLU choice mode agrees with lm-evaluation-harness item by item, k-shot
prompts and their context budget, chat formats, and summaries that refuse to be compared."""
from __future__ import annotations

import json
import shutil

import pytest

from laten_ray.eval.evaluate import check_comparable, evaluate
from laten_ray.formats import GSM8K_EXEMPLARS
from laten_ray.models import resolve
from laten_ray.records import resolve_path

MODEL = "tiny:demo-source"
SUBJECT = "high_school_geography"


def mmlu_subset(tmp_path, n: int = 30):
    """The first n test questions of one subject, and its five dev questions, as jsonl files."""
    rows = [json.loads(line) for line in open(resolve_path("data/eval/mmlu_test.jsonl"), encoding="utf-8")]
    dev = [json.loads(line) for line in open(resolve_path("data/eval/mmlu_dev.jsonl"), encoding="utf-8")]
    test_file, dev_file = tmp_path / "test.jsonl", tmp_path / "dev.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["subject"] == SUBJECT][:n]))
    dev_file.write_text("".join(json.dumps(r) + "\n" for r in dev if r["subject"] == SUBJECT))
    return test_file, dev_file


def lm_eval_task(folder, test_file, dev_file) -> str:
    """MMLU's layout in lm-evaluation-harness (its mmlu task's template), on local files."""
    (folder / "task.yaml").write_text(f'''task: laten_mmlu_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test_file}
    dev: {dev_file}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {SUBJECT.replace('_', ' ')}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
''')
    return "laten_mmlu_check"


@pytest.mark.slow
@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_choice_mode_picks_what_lm_eval_picks(tmp_path, monkeypatch, shots):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra")
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    test_file, dev_file = mmlu_subset(tmp_path)
    task = lm_eval_task(tmp_path, test_file, dev_file)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={resolve(MODEL)},dtype=float32,add_bos_token=True", tasks=[task],
        num_fewshot=shots, device="cpu", batch_size=1, task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True)
    samples = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
    their_letters = ["ABCD"[max(range(4), key=lambda i: (s["filtered_resps"][i][0], -i))] for s in samples]
    ours = evaluate(MODEL, "mmlu", str(test_file), tmp_path / "ours", {
        "engine": "hf", "chat_format": "plain", "mode": "choice", "shots": shots, "dev": str(dev_file)},
        progress=False)
    records = [json.loads(line) for line in (tmp_path / "ours" / "examples.jsonl").read_text().splitlines()]
    assert len(records) == len(samples) == 30
    assert [r["extracted"][0] for r in records] == their_letters
    assert ours["value"] == pytest.approx(theirs["results"][task]["acc,none"], abs=1e-12)
    for r, s in zip(records, samples):  # the same prompt and the same numbers
        assert r["input"] == s["arguments"][0][0]
        assert r["loglikelihoods"] == pytest.approx([x[0] for x in s["filtered_resps"]], abs=1e-4)
    assert ours["protocol"] == {"format": "plain", "shots": shots, "mode": "choice",
                                **({"dev": str(dev_file)} if shots else {})}


def test_gsm8k_eight_shot_prompt_and_shots_dropped_to_fit(tmp_path):
    """Eight exemplars fill more than the tiny model's 1024-token context with room for 64 new
    tokens, so shots are dropped from the end until the prompt fits; plain text stops at the
    next exemplar."""
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "Ada has 3 apples and gets 4 more. How many?", "answer": "#### 7"}) + "\n")
    summary = evaluate(MODEL, "gsm8k", str(data), tmp_path / "out", {
        "engine": "hf", "chat_format": "plain", "shots": 8, "max_tokens": 64}, progress=False)
    [record] = [json.loads(line) for line in (tmp_path / "out" / "examples.jsonl").read_text().splitlines()]
    text, kept = record["input"], record["shots"]
    assert 0 < kept < 8
    assert text.startswith(f"Answer the following questions.\n\nQuestion: {GSM8K_EXEMPLARS[0][0]}\nAnswer: ")
    assert text.count("So the answer is") == kept and text.endswith("Question: Ada has 3 apples and gets 4 more. "
                                                                    "How many?\nAnswer:")
    assert "\n\nQuestion:" in summary["sampling"]["stop"]
    short = evaluate(MODEL, "gsm8k", str(data), tmp_path / "out3", {
        "engine": "hf", "chat_format": "laten", "shots": 3, "max_tokens": 8}, progress=False)
    [record] = [json.loads(line) for line in (tmp_path / "out3" / "examples.jsonl").read_text().splitlines()]
    assert record["shots"] == 3 and record["input"].startswith("<|user|>\nAnswer the following questions.")
    assert record["input"].endswith("<|assistant|>\n") and "<|user|>" in short["sampling"]["stop"]


def test_model_chat_format_uses_the_tokenizer_template(tmp_path):
    folder = tmp_path / "templated"
    shutil.copytree(resolve(MODEL), folder)
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n")
    with pytest.raises(ValueError, match="tokenizer has no chat template; use --chat-format laten or plain"):
        evaluate(str(folder), "gsm8k", str(data), tmp_path / "o", {"engine": "hf", "chat_format": "model",
                                                                    "max_tokens": 4}, progress=False)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    evaluate(str(folder), "gsm8k", str(data), tmp_path / "o", {"engine": "hf", "chat_format": "model",
                                                                "max_tokens": 4}, progress=False)
    [record] = [json.loads(line) for line in (tmp_path / "o" / "examples.jsonl").read_text().splitlines()]
    assert record["input"] == "[user] Answer the following question.\n\nQuestion: What is 2 + 3?\n[assistant] "


def test_summaries_of_different_protocols_refuse_to_be_compared(tmp_path):
    test_file, _ = mmlu_subset(tmp_path, n=4)
    runs = {mode: evaluate(MODEL, "mmlu", str(test_file), tmp_path / mode, {"engine": "hf", "mode": mode},
                           progress=False) for mode in ("choice", "generate")}
    check_comparable(runs["choice"], dict(runs["choice"]))  # the same protocol: fine
    with pytest.raises(ValueError, match=r"not comparable; they differ in protocol: .*'mode': 'choice'.*'mode': 'generate'"):
        check_comparable(runs["choice"], runs["generate"])
    assert runs["choice"]["protocol"]["mode"] == "choice"  # MMLU's default
    with pytest.raises(ValueError, match="mode: 'choice' is not available for gsm8k"):
        evaluate(MODEL, "gsm8k", str(test_file), tmp_path / "x", {"mode": "choice"}, progress=False)
