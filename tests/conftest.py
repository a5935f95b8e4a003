"""Session setup: one torch thread, and built tiny models and demo data in a fresh cache folder
(nothing is downloaded). Shared helpers are in helpers.py."""
from __future__ import annotations

import os

import pytest
import torch

# Two busy threads on two shared cores run far slower than one.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
