"""The real `laten` command in a subprocess: bad inputs fail fast with a clear message, exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from laten_ray import models

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = "configs/tiny.yaml"
FAST_S = 30  # an error is reported before any model loads: a few seconds of imports at most


def laten(*args: str, cache: Path, timeout: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "LATEN_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def fails(*args: str, cache: Path) -> str:
    """Run a command that must fail fast with exit code 2; return its stderr."""
    done, seconds = laten(*args, cache=cache)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert seconds < FAST_S
    assert "laten: error: " in done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.fixture
def runs(tmp_path) -> Path:
    """The output_dir handed to `train`; a config error must leave it uncreated."""
    return tmp_path / "runs"


def test_train_with_missing_config_file(tmp_path, runs, laten_cache):
    err = fails("train", "--config", str(tmp_path / "missing.yaml"), f"output_dir={runs}",
                cache=laten_cache)
    assert "missing.yaml" in err and "not found" in err
    assert not runs.exists()


def test_train_with_unknown_key(runs, laten_cache):
    err = fails("train", "--config", TINY_YAML, f"output_dir={runs}", "train.lrr=1",
                cache=laten_cache)
    assert "'train.lrr'" in err and "unknown key" in err
    assert not runs.exists()


def test_train_with_rate_out_of_range(runs, laten_cache):
    err = fails("train", "--config", TINY_YAML, f"output_dir={runs}", "transfer.rate=1.5",
                cache=laten_cache)
    assert "transfer.rate: rate must be in (0, 1], got 1.5" in err
    assert not runs.exists()


def test_merge_with_bad_config_value(runs, tmp_path, laten_cache):
    err = fails("merge", "--config", TINY_YAML, "--out", str(tmp_path / "merged"),
                f"output_dir={runs}", "source.model=/no/such/dir", cache=laten_cache)
    assert "source.model: model folder '/no/such/dir' not found" in err
    assert not runs.exists() and not (tmp_path / "merged").exists()


def test_attribute_with_missing_model(tmp_path, laten_cache):
    out = tmp_path / "x.safetensors"
    err = fails("attribute", "--model", "/no/such", "--data", "demo:extract", "--out", str(out),
                cache=laten_cache)
    assert "model folder '/no/such' not found" in err
    assert not out.exists()


def test_attribute_with_bad_data_line(tmp_path, laten_cache):
    data = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "messages": [{"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "A."}]})
    data.write_text(f"{good}\n\n{good}\n{{\"messages\": [}}\n", encoding="utf-8")
    out = tmp_path / "x.safetensors"
    err = fails("attribute", "--model", "tiny:qwen2-target", "--data", str(data), "--out", str(out),
                cache=laten_cache)
    assert f"{data}:4: not valid JSON" in err
    assert not out.exists()


def test_attribute_writes_scores_of_the_models_sizes(tmp_path, laten_cache, monkeypatch):
    out = tmp_path / "scores" / "OUT.safetensors"
    done, _ = laten("attribute", "--model", "tiny:qwen2-target", "--data", "demo:extract",
                    "--limit", "2", "--device", "cpu", "--out", str(out), cache=laten_cache,
                    timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (2 examples)" in done.stdout

    monkeypatch.setenv("LATEN_CACHE", str(laten_cache))
    config = json.loads((models.resolve("tiny:qwen2-target") / "config.json").read_text())
    L, f = config["num_hidden_layers"], config["intermediate_size"]
    attn = config["num_attention_heads"] * config["head_dim"]
    assert (L, f, attn) == (4, 192, 96)  # head_dim 24 != hidden 64 / 4 heads: read, not derived

    with safe_open(str(out), framework="pt") as sf:
        assert sf.metadata() == {"model": "tiny:qwen2-target", "data": "demo:extract",
                                 "examples": "2"}
        tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "layer_attn": (L,), "layer_ffn": (L,), "ffn": (L, f), "attn": (L, attn)}
    for name, t in tensors.items():
        assert t.dtype == torch.float32, name
        assert t.isfinite().all(), name
        assert t.abs().sum() > 0, name
    assert [p.name for p in out.parent.iterdir()] == ["OUT.safetensors"]  # no temp file left
