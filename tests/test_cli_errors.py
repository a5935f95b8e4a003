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


# --- the hints a newcomer needs ---------------------------------------------------------------

def test_a_config_value_given_as_an_option_names_its_key(runs, laten_cache):
    for command in ("train", "study"):
        config = TINY_YAML if command == "train" else "configs/study-demo.yaml"
        done, _ = laten(command, "--config", config, "--lr", "1e-3", f"output_dir={runs}", cache=laten_cache)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        expected = "train.lr=1e-3" if command == "train" else "sft.lr=1e-3 or laten.train.lr=1e-3"
        assert f"laten {command}: error: unrecognized option --lr: a config value is given as key=value after the " \
               f"options: {expected}" in done.stderr, done.stderr
    done, _ = laten("train", "--config", TINY_YAML, "--steps=3", cache=laten_cache)
    assert "train.steps=3" in done.stderr
    done, _ = laten("train", "--config", TINY_YAML, "--no-such-thing", cache=laten_cache)
    assert "unrecognized arguments: --no-such-thing" in done.stderr and not runs.exists()


def test_a_list_override_shows_its_syntax(tmp_path, laten_cache):
    err = fails("study", "--config", "configs/study-demo.yaml", f"output_dir={tmp_path}", "arms=target,laten",
                cache=laten_cache)
    assert "arms: expected a list, got 'target,laten'; a list is written in brackets, e.g. " \
           "'arms=[target,laten]' (quoted on the command line" in err
    # what an unquoted `arms=[target, laten]` becomes in the shell: two words
    err = fails("study", "--config", "configs/study-demo.yaml", f"output_dir={tmp_path}", "arms=[target,", "laten]",
                cache=laten_cache)
    assert "a list on the command line is quoted so the shell keeps it one word, e.g. 'arms=[target, laten]'" in err


def test_a_path_that_nearly_exists_is_suggested(tmp_path, laten_cache):
    err = fails("train", "--config", "configs/gsm.yaml", "data.align=data/gsm8k/gsm_align_split.jsonl",
                "source.model=tiny:llama-source", "target.model=tiny:llama-target", cache=laten_cache)
    assert "data file 'data/gsm8k/gsm_align_split.jsonl' not found" in err
    assert "did you mean 'data/gsm/gsm_align_split.jsonl'?" in err
    err = fails("train", "--config", "configs/tinny.yaml", cache=laten_cache)
    assert "config file 'configs/tinny.yaml' not found; did you mean 'configs/tiny.yaml'?" in err


@pytest.mark.slow  # over 10 s on 2 cores
def test_a_run_folder_and_a_merged_folder_given_for_each_other(tmp_path, laten_cache):
    """On a real run folder and its real merged folder, as `laten train` and `laten merge` make them."""
    done, _ = laten("train", "--config", TINY_YAML, f"output_dir={tmp_path}", "train.steps=1", cache=laten_cache,
                    timeout=300)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "tiny"
    err = fails("evaluate", "--model", str(run), "--task", "demo", "--data", "demo:test", "--out",
                str(tmp_path / "e"), cache=laten_cache)
    assert f"'{run}' is a LaTen run folder, not a model: merge it first (laten merge --run {run}), then give " \
           f"{run / 'merged'}" in err
    done, _ = laten("merge", "--run", str(run), cache=laten_cache, timeout=300)
    assert done.returncode == 0, done.stderr
    err = fails("serve", "--model", str(run), cache=laten_cache)
    assert f"'{run}' is a LaTen run folder, not a model: give '{run / 'merged'}'" in err
    err = fails("merge", "--run", str(run / "merged"), cache=laten_cache)
    assert f"'{run / 'merged'}' is a merged model folder, not a run folder: its run is '{run}'" in err
    err = fails("merge", "--run", str(tmp_path / "tinny"), cache=laten_cache)
    assert f"did you mean '{run}'?" in err


def test_more_align_examples_per_step_than_the_align_set_has(runs, laten_cache):
    err = fails("train", "--config", TINY_YAML, f"output_dir={runs}", "train.align_per_step=65", cache=laten_cache)
    assert "train.align_per_step: 65 align examples per step, but data.align (demo:align) has 64" in err
    assert not runs.exists()
