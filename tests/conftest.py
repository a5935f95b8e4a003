"""Shared fixtures: tiny random models built from configs into a per-session cache (no downloads)."""
from __future__ import annotations

import os

import pytest
import torch

# Two busy threads on two shared cores run far slower than one.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ["llama", "qwen2"]  # llama: multi-head attention; qwen2: grouped-query, head_dim != d/heads


@pytest.fixture(scope="session", autouse=True)
def laten_cache(tmp_path_factory):
    """Built tiny models and demo data go to a fresh folder for this test session."""
    path = tmp_path_factory.mktemp("laten-cache")
    old = os.environ.get("LATEN_CACHE")
    os.environ["LATEN_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LATEN_CACHE", None)
    else:
        os.environ["LATEN_CACHE"] = old


def tiny_config_dict(family: str, run_root, **train) -> dict:
    """A complete training config for the family's tiny source/target pair, as plain data."""
    return {
        "name": f"{family}-run", "output_dir": str(run_root), "seed": 0,
        "source": {"model": f"tiny:{family}-source", "device": "cpu"},
        "target": {"model": f"tiny:{family}-target", "device": "cpu"},
        "data": {"align": "demo:align", "extract": "demo:extract", "max_length": 128},
        "transfer": {"rate": 0.25},
        "hypernet": {"init_std": 0.02},
        "train": {"steps": 3, "align_per_step": 5, "micro_batch_size": 3, "lr": 1e-3, **train},
    }
