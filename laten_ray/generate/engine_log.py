"""When vLLM cannot run a model: its own output goes to a log file, and the user reads one line.

vLLM prints dozens of lines while it starts, and when its engine process dies it prints a
traceback from each of its processes. Evaluation and serving both start vLLM inside
`captured(log)`, so that all of it (the engine processes inherit the redirected descriptors)
lands in the log; a failure before the first result is then told in one line that names the
root cause and the log. With `engine: auto` the caller goes on with transformers; with
`engine: vllm` it stops with that line.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

LOG_NAME = "vllm.log"
_ERROR = re.compile(r"\b((?:[A-Z]\w*)?(?:Error|Exception)): (.+)$")


def log_path(folder: str | Path | None, what: str = "") -> Path:
    """Where vLLM's output goes: `folder/vllm.log`, or without a folder (a server) a new file
    under $LATEN_CACHE/logs."""
    if folder is not None:
        return Path(folder) / LOG_NAME
    from ..builtin import cache_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cache_dir() / "logs" / f"vllm-{what or 'engine'}-{stamp}-{os.getpid()}.log"


class _LatenFileHandler(logging.FileHandler):
    """Marks the handler this module put on vLLM's logger, so a later engine replaces it."""


def _vllm_logger_to(path: Path) -> None:
    """vLLM's own logger (this process's side of the engine) writes to the log, not the terminal."""
    if "vllm" not in sys.modules:
        return
    logger = logging.getLogger("vllm")
    for handler in list(logger.handlers):
        if isinstance(handler, _LatenFileHandler) or type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
            handler.close()
    handler = _LatenFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"))
    logger.addHandler(handler)


class EngineLog:
    """One engine's log file; what it says about a failure is read from where this engine began."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start = self.path.stat().st_size if self.path.exists() else 0

    @contextmanager
    def captured(self):
        """Descriptors 1 and 2 point at the log for the duration, so the engine processes vLLM
        starts here write there for their whole life; afterwards vLLM's logger in this process
        does too."""
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        saved = (os.dup(1), os.dup(2))
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for f in (*saved, fd):
                os.close(f)
            _vllm_logger_to(self.path)

    def cause(self, e: BaseException) -> str:
        """The root cause in a few words: the first `SomethingError: message` that vLLM's
        processes wrote (the engine's death reaches this process only as "see above"), else
        the exception's own last line."""
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.start)
                text = f.read()
        except OSError:
            text = ""
        for line in text.splitlines():
            m = _ERROR.search(line)
            if m and "EngineDead" not in m.group(1):
                return _short(f"{m.group(1)}: {m.group(2)}")
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return _short(f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__)

    def explain(self, e: BaseException, when: str, model: str) -> str:
        """Record the failure's traceback in the log; the one line that tells it."""
        cause = self.cause(e)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"\n--- laten: vLLM failed {when} ---\n")
            f.write("".join(traceback.format_exception(e)))
        return f"vLLM cannot run {model} ({when}: {cause}); its output is in {self.path}"


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
