"""Run untrusted generated programs (HumanEval, MBPP) and tell whether they passed.

Every program runs in its own process (`sandbox_init.py` sets it up) in fresh Linux namespaces:
no network (an empty network namespace), a read-only file system with empty /tmp, /dev/shm
and /run, a small tmpfs as its working directory, its own PID namespace (it sees no other
process, and everything it starts dies with it), a scrubbed environment, and limits on wall
clock, CPU time, memory, processes, file size and open files. As root it also runs as an
unprivileged uid of its own; otherwise inside a user namespace with no capabilities.
Many run in parallel; a program that crashes, hangs or attacks only fails itself.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

INIT = Path(__file__).with_name("sandbox_init.py")
SETUP_FAILED, TIMED_OUT = 125, 124
FIRST_UID = 100_000  # sandbox slot i runs as uid FIRST_UID + i (as root)


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate programs (no namespaces); nothing untrusted is run."""


@dataclass
class Limits:
    timeout_s: float = 10.0   # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024     # address space
    processes: int = 32       # processes and threads
    file_mb: int = 16         # largest file written (stdout and stderr included)
    disk_mb: int = 64         # the working directory's tmpfs
    output_chars: int = 4000  # kept of stdout / stderr


@dataclass
class Outcome:
    status: str        # passed | failed | timeout | setup_error
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _runnable_by_anyone(path: Path) -> bool:
    """Whether an unprivileged user can execute `path` (every folder above it searchable)."""
    try:
        mode = path.stat().st_mode
        if not (mode & stat.S_IXOTH and mode & stat.S_IROTH):
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


@functools.cache
def interpreter() -> str:
    """The Python that runs the programs. As root the program runs as an unprivileged uid,
    which may not reach this virtualenv (say, under /root): then a system Python 3."""
    if os.geteuid() != 0:
        return sys.executable
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and _runnable_by_anyone(Path(os.path.realpath(candidate))):
            return os.path.realpath(candidate)
    raise SandboxUnavailable("no Python interpreter that an unprivileged user can run "
                             f"({sys.executable} is not readable by others; install python3 in /usr/bin)")


def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", "replace")[-chars:]


def run_program(code: str, limits: Limits = Limits(), slot: int = 0) -> Outcome:
    """Run `code` as a Python program in the sandbox; passed means exit status 0 in time."""
    as_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="laten-sandbox-") as tmp:
        workdir, out, err = Path(tmp, "work"), Path(tmp, "stdout"), Path(tmp, "stderr")
        workdir.mkdir()
        (workdir / "main.py").write_text(code, encoding="utf-8")
        error_file = Path(tmp, "setup-error")
        spec = {"workdir": str(workdir), "error_file": str(error_file), "python": interpreter(), "as_root": as_root,
                "uid": FIRST_UID + slot, "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s,
                "memory_mb": limits.memory_mb, "processes": limits.processes,
                "file_mb": limits.file_mb, "disk_mb": limits.disk_mb}
        t0 = time.monotonic()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(INIT), json.dumps(spec)],
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=tmp,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                    start_new_session=True)
            try:
                code_ = proc.wait(timeout=limits.timeout_s + 10)  # init enforces the limit itself
            except subprocess.TimeoutExpired:
                proc.kill()
                code_ = proc.wait()
        seconds = time.monotonic() - t0
        stderr = _tail(err, limits.output_chars)
        setup_error = error_file.read_text() if error_file.is_file() else ""
        if code_ == SETUP_FAILED and setup_error:
            raise SandboxUnavailable(f"sandbox: {setup_error}")
        status = "passed" if code_ == 0 else "timeout" if code_ == TIMED_OUT else "failed"
        return Outcome(status, code_, _tail(out, limits.output_chars), stderr, seconds)


def run_programs(codes: list[str], limits: Limits = Limits(), workers: int | None = None,
                 on_done=None) -> list[Outcome]:
    """Run many programs in parallel (default: one per CPU); results in input order.
    `on_done(i, outcome)` is called as each finishes."""
    workers = max(1, workers or os.cpu_count() or 1)
    slots: queue.Queue = queue.Queue()  # a uid per running program: its process limit is its own
    for s in range(workers):
        slots.put(s)

    def one(i: int) -> Outcome:
        slot = slots.get()
        try:
            outcome = run_program(codes[i], limits, slot)
        finally:
            slots.put(slot)
        if on_done:
            on_done(i, outcome)
        return outcome
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(len(codes))))
