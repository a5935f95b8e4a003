"""Files that are never seen half-written (write to a temporary name, fsync, then rename),
the run folder's checkpoints, and a writer that saves them while training goes on."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import torch

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() follows the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting it, even for
    a moment, would race with files other threads create)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, then put straight back
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700) and the files in it the modes that plain writes get."""
    mask = _umask()
    for path in [Path(folder), *Path(folder).rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def save_model_folder(model, tokenizer, out: Path, files: dict | None = None) -> None:
    """An HF model folder (weights, tokenizer and JSON `files` by name) written whole under a
    temporary name, then swapped in for `out`; what was at `out` is removed only after."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, value in (files or {}).items():
            save_json(value, tmp / name)
        follow_umask(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_png(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure as a PNG without a version stamp (a rebuilt report is byte-equal),
    written atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    save_bytes(buf.getvalue(), path)


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


def snapshot(obj):
    """A copy of a state tree whose tensors are detached CPU copies (training goes on meanwhile)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


class BackgroundWriter:
    """Runs one write at a time in a thread while training goes on. The next `submit`, or
    `wait`, waits for the last write and raises its error if it failed. A crash before a write
    ends loses only that write; the caller's data must be a snapshot (it is read later)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None], name: str = "checkpoint", background: bool = True) -> None:
        self.wait()
        if not background:
            write()
            return

        def run() -> None:
            try:
                write()
            except BaseException as e:  # noqa: BLE001 - raised again by wait
                self._error = e
        self._thread = threading.Thread(target=run, name=name, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        if error is not None:
            raise error
