"""Files that are never seen half-written: write to a temporary name, fsync, then rename."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj, path: Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


def save_bytes(data: bytes, path: Path) -> None:
    _atomic(Path(path), lambda f: f.write(data))


def save_text(text: str, path: Path) -> None:
    save_bytes(text.encode("utf-8"), path)


def save_json(obj, path: Path) -> None:
    save_text(json.dumps(obj, indent=2) + "\n", path)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:05d}.pt"


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Completed steps that have a checkpoint, ascending."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))


def load_checkpoint(run_dir: Path, step: int | None = None) -> dict:
    """The checkpoint after `step` steps (default: the last one)."""
    steps = checkpoint_steps(run_dir)
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {Path(run_dir) / 'checkpoints'}")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} under {run_dir}; have {steps}")
    return torch.load(checkpoint_path(run_dir, step), map_location="cpu", weights_only=True)
