"""What ships without a download: the demo task's data (`demo.py`, written once into the cache
folder), the tiny random models built from configs into the cache folder, and the demo pair
shipped pre-trained in `weights/` (`tiny.py`)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where built-in models and data are written: $LATEN_CACHE, default ~/.cache/laten-ray."""
    return Path(os.environ.get("LATEN_CACHE", Path.home() / ".cache" / "laten-ray"))
