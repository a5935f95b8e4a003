"""The README's main job on the built-in default, as a user runs it: `laten train` then `laten merge`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from laten_ray.merge import REPORT

REPO = Path(__file__).resolve().parents[1]


def laten(*args, env, cwd=REPO):
    # umask 022, as in a usual shell, so file modes can be checked against it
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=lambda: os.umask(0o022))


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


@pytest.mark.slow  # over 10 s on 2 cores
def test_default_job_trains_pretrained_tiny_models_and_merges(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # LATEN_CACHE comes from the session fixture
    out = tmp_path / "merged"
    trained = laten("train", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", env=env)
    assert trained.returncode == 0, trained.stderr
    lines = [l for l in trained.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 8 and lines[-1].startswith("step 8/8")  # one step per extract example
    losses = [json.loads(l)["lm_loss"] for l in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    # the shipped demo target knows the answer format, not the table: its answer loss is far
    # below uniform (ln 512 = 6.24) and far above the source's (about 0.001)
    assert all(0.5 < x < 5.0 for x in losses), losses
    merged = laten("merge", "--run", str(tmp_path / "tiny"), "--out", str(out), env=env)  # no overrides again
    assert merged.returncode == 0, merged.stderr
    # every file as an ordinary write under umask 022 makes it: run files, checkpoints, the merge
    for path, mode in {**modes(tmp_path / "tiny"), **modes(out)}.items():
        assert mode == (0o755 if mode & 0o100 else 0o644), (path, oct(mode))
    report = json.loads((out / REPORT).read_text())
    assert report["step"] == 8 and set(report["modules"]) == {"up", "down", "v", "o"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


@pytest.mark.slow  # over 10 s on 2 cores
def test_a_paper_config_runs_from_any_directory_with_tiny_models(tmp_path):
    """configs/gsm.yaml reads data/gsm/... from the repository wherever it is started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = ["source.model=tiny:llama-source", "target.model=tiny:llama-target", "source.device=cpu",
                 "target.device=cpu", "source.dtype=float32", "target.dtype=float32", "train.steps=2"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = laten("train", "--config", str(REPO / "configs" / "gsm.yaml"), *overrides, "output_dir=runs",
                 env=env, cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    assert [l.split()[1] for l in done.stdout.splitlines() if l.startswith("step ")] == ["1/2", "2/2"]
    metrics = [json.loads(l) for l in (elsewhere / "runs" / "gsm-llama2-13b-7b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["tokens"] > 100 for m in metrics)
    merged = laten("merge", "--run", str(elsewhere / "runs" / "gsm-llama2-13b-7b"), env=env, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    report = json.loads((elsewhere / "runs" / "gsm-llama2-13b-7b" / "merged" / REPORT).read_text())
    assert report["seed_example"]["data"] == "data/gsm/gsm_extract_split.jsonl" and report["step"] == 2
