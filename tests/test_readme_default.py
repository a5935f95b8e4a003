"""The README's main job on the built-in default, as a user runs it: `laten train` then `laten merge`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from laten_ray.merge import REPORT

REPO = Path(__file__).resolve().parents[1]


def laten(*args, env):
    return subprocess.run([sys.executable, "-m", "laten_ray.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_default_job_trains_pretrained_tiny_models_and_merges(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # LATEN_CACHE comes from the session fixture
    out = tmp_path / "merged"
    trained = laten("train", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", env=env)
    assert trained.returncode == 0, trained.stderr
    lines = [l for l in trained.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 8 and lines[-1].startswith("step 8/8")  # one step per extract example
    losses = [json.loads(l)["lm_loss"] for l in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    # the demo target was pre-trained: its answer loss is far below uniform (ln 512 = 6.24)
    assert all(0.5 < x < 5.0 for x in losses), losses
    merged = laten("merge", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}", "--out", str(out),
                   env=env)
    assert merged.returncode == 0, merged.stderr
    report = json.loads((out / REPORT).read_text())
    assert report["step"] == 8 and set(report["modules"]) == {"up", "down", "v", "o"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()
