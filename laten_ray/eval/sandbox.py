"""Run untrusted generated programs (HumanEval, MBPP) and tell whether they passed.

Every program runs in its own process (`sandbox_init.py` sets it up) in fresh Linux namespaces:
no network (an empty network namespace), a minimal root that holds only the interpreter's
files (read-only), device nodes, an empty /tmp and a small tmpfs as its working directory (no
project files, no benchmarks, no /proc), its own PID namespace (everything it starts dies with
it), a scrubbed environment, and limits on wall clock, CPU time, memory, processes, file size
and open files. As root it also runs as an unprivileged uid of its own; otherwise inside a user
namespace with no capabilities. Many run in parallel; a program that crashes, hangs or attacks
only fails itself.

The verdict is the judge's (judge.py): the solution, then the tests, run to their end in
fresh namespaces, reported on a pipe with a per-run secret. Exit status and output are never
the verdict, so sys.exit(0), os._exit(0), exit hooks, tracing, patched builtins and rigged
__eq__ all fail.
"""
from __future__ import annotations

import functools
import json
import os
import queue
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

INIT = Path(__file__).with_name("sandbox_init.py")
JUDGE = Path(__file__).with_name("judge.py")
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


@dataclass(frozen=True)
class Program:
    solution: str
    tests: str = ""                        # run after the solution, in a copy of its namespace
    entry_points: tuple[str, ...] = ()     # the function under test first: its results must be plain data


@dataclass
class Outcome:
    status: str        # passed | failed | timeout
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""   # why it failed, as the judge saw it

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


@functools.cache
def visible_paths() -> tuple[str, ...]:
    """What the minimal root shows, read-only: the interpreter's prefix and the system's library
    and binary folders (for its shared libraries), nothing else of this machine."""
    python = interpreter()
    paths = {"/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/etc/ld.so.cache", os.path.dirname(python)}
    try:
        prefixes = subprocess.run([python, "-I", "-S", "-c", "import sys; print(sys.base_prefix, sys.base_exec_prefix)"],
                                  capture_output=True, text=True, timeout=30).stdout.split()
        paths.update(prefixes)
    except (OSError, subprocess.SubprocessError):
        pass  # the sandbox reports the broken interpreter itself
    kept: list[str] = []
    for path in sorted(p for p in paths if os.path.lexists(p)):  # parents first
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept if not os.path.islink(k)):
            kept.append(path)
    return tuple(kept)


def _verdict(raw: bytes, secret: bytes) -> tuple[bool, str] | None:
    """(passed, reason) from the judge's line with this run's secret; None if there is none."""
    for line in raw.splitlines():
        word, _, rest = line.partition(b" ")
        token, _, reason = rest.partition(b" ")
        if token == secret and word in (b"PASS", b"FAIL"):
            return word == b"PASS", reason.decode("utf-8", "replace")
    return None


def _tail(path: Path, chars: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * chars))
        return f.read().decode("utf-8", "replace")[-chars:]


def run_program(program: Program | str, limits: Limits = Limits(), slot: int = 0) -> Outcome:
    """Run `program` in the sandbox; passed means the judge saw its tests run to their end.
    A plain string is a solution without tests: it passes when it runs to its end."""
    if isinstance(program, str):
        program = Program(program)
    as_root = os.geteuid() == 0
    secret = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="laten-sandbox-") as tmp:
        workdir, out, err, root = Path(tmp, "work"), Path(tmp, "stdout"), Path(tmp, "stderr"), Path(tmp, "root")
        workdir.mkdir()
        root.mkdir()
        secret_r, secret_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        os.write(secret_w, secret + b"\n")
        os.close(secret_w)
        (workdir / "judge.py").write_bytes(JUDGE.read_bytes())
        (workdir / "solution.py").write_text(program.solution, encoding="utf-8")
        (workdir / "tests.py").write_text(program.tests, encoding="utf-8")
        error_file = Path(tmp, "setup-error")
        spec = {"workdir": str(workdir), "root": str(root), "visible": list(visible_paths()),
                "error_file": str(error_file), "python": interpreter(), "as_root": as_root,
                "uid": FIRST_UID + slot, "timeout_s": limits.timeout_s, "cpu_s": limits.cpu_s,
                "memory_mb": limits.memory_mb, "processes": limits.processes,
                "file_mb": limits.file_mb, "disk_mb": limits.disk_mb, "pass_fds": [secret_r, verdict_w],
                "judge_args": [str(secret_r), str(verdict_w), *program.entry_points]}
        t0 = time.monotonic()
        try:
            with open(out, "wb") as fo, open(err, "wb") as fe:
                proc = subprocess.Popen([sys.executable, "-I", "-S", str(INIT), json.dumps(spec)],
                                        stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=tmp,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                        start_new_session=True, pass_fds=(secret_r, verdict_w))
                os.close(secret_r)
                os.close(verdict_w)
                try:
                    code = proc.wait(timeout=limits.timeout_s + 10)  # init enforces the limit itself
                except subprocess.TimeoutExpired:
                    proc.kill()
                    code = proc.wait()
            raw = _read_available(verdict_r)
        finally:
            os.close(verdict_r)
        seconds = time.monotonic() - t0
        setup_error = error_file.read_text() if error_file.is_file() else ""
        if code == SETUP_FAILED and setup_error:
            raise SandboxUnavailable(f"sandbox: {setup_error}")
        verdict = _verdict(raw, secret)
        if code == TIMED_OUT:
            status, detail = "timeout", f"no verdict within {limits.timeout_s} s"
        elif code == 128 + signal.SIGXCPU:
            status, detail = "timeout", f"over its {limits.cpu_s} s of CPU time"
        elif verdict is None:
            status, detail = "failed", f"no verdict: the process ended first (exit status {code})"
        else:
            status, detail = ("passed" if verdict[0] else "failed"), verdict[1]
        return Outcome(status, code, _tail(out, limits.output_chars), _tail(err, limits.output_chars),
                       seconds, detail)


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
    """What is in a pipe whose writers are gone (a flood is cut at `limit`)."""
    chunks, size = [], 0
    while size < limit and (chunk := os.read(fd, limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def run_programs(codes: list[Program | str], limits: Limits = Limits(), workers: int | None = None,
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
