"""Run untrusted generated programs (HumanEval, MBPP) and tell whether they passed.

Every program runs in its own process (`sandbox_init.py` sets it up) in fresh Linux namespaces:
no network (an empty network namespace), a minimal root that holds only the interpreter's
files (read-only), device nodes, an empty /tmp and a small tmpfs as its working directory (no
project files, no benchmarks, no /proc), its own PID namespace (everything it starts dies with
it), a scrubbed environment, and limits on wall clock, CPU time, memory, processes, file size
and open files. As root it also runs as an unprivileged uid of its own; otherwise inside a user
namespace with no capabilities. A seccomp filter (sandbox_init.py lists what it refuses) keeps
it from the kernel keyrings, AF_VSOCK and every socket family but AF_INET/AF_INET6, new
namespaces, ptrace and other processes' memory, io_uring, bpf, perf, userfaultfd, mounts and
the like, and from every Unix socket of the host: seccomp cannot read the path in a sockaddr,
so socket(AF_UNIX) is refused outright, even for a path in the program's own directory, and
only a connected AF_UNIX stream socketpair is allowed (multiprocessing's pipes; its Manager and
forkserver need a listening socket and do not work). Where the filter cannot be installed
(another architecture than x86_64 and aarch64) nothing runs: SandboxUnavailable. Many run in
parallel; a program that crashes, hangs or attacks only fails itself.

Memory and processes are bounded for the whole program, all its processes together, besides
RLIMIT_AS and RLIMIT_NPROC per process: where this process can make a cgroup (root with the
cgroup v1 memory and pids hierarchies, or a cgroup v2 subtree delegated with both controllers),
each run gets its own, `laten-sandbox-*` under this process's cgroup, with memory (swap
included) limited to Limits.memory_mb and tasks to Limits.processes (the sandbox's waiting init
counts as one); the sandbox joins it before anything else runs, the kernel kills a process of it
(v1) or all of it (v2) when the memory is used up, and it is removed after the run, whatever
the end (what is left in it is killed first). Elsewhere, or with LATEN_SANDBOX_NO_CGROUP=1,
the sandbox's waiting parent polls the anonymous memory of all its processes every 20 ms and
kills the sandbox over the budget: a polling bound, which can overshoot by what is allocated
between two polls. Outcome.budget says which one bounded a run;
a program over the memory budget fails with "memory budget of N MB exceeded (...)".

The verdict is the judge's (judge.py): two processes, the solution alone in one, the tests
and the item's own helpers in the other, joined by a channel that carries plain data only;
PASS is the test process returning from the tests, written on a pipe only it holds. Exit
status and output are never the verdict, and nothing the solution does reaches the tests.
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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

INIT = Path(__file__).with_name("sandbox_init.py")
JUDGE_FILES = ("judge.py", "plain.py")  # the judge's code, beside the solution and loaded by the tests
TIMED_OUT = 124  # sandbox_init's exit status at the wall clock
FIRST_UID = 100_000  # as root, sandbox slot i runs its solution as uid FIRST_UID + i
TEST_UIDS = 50_000   # and its tests as uid FIRST_UID + TEST_UIDS + i
CGROUP_PREFIX = "laten-sandbox-"
POLLING = "polling"


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate programs (no namespaces, no seccomp filter); nothing untrusted is run."""


@dataclass
class Limits:
    timeout_s: float = 10.0   # wall clock
    cpu_s: int = 10
    memory_mb: int = 1024     # address space of each process, and memory of all together
    processes: int = 32       # processes and threads (with a cgroup: the sandbox's waiting init too)
    file_mb: int = 16         # largest file written (stdout and stderr included)
    disk_mb: int = 64         # the working directory's tmpfs
    output_chars: int = 4000  # kept of stdout / stderr


@dataclass(frozen=True)
class Program:
    solution: str
    tests: str = ""                        # run in the test process once the solution has run to its end
    entry_points: tuple[str, ...] = ()     # the names the tests call, the function under test first
    helpers: str = ""                      # the item's own code the tests may use (trusted: its prompt,
                                           # or the classes of its reference), run before the tests


@dataclass
class Outcome:
    status: str        # passed | failed | timeout
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""   # why it failed, as the judge (or the budget) saw it
    budget: str = ""   # what bounded the whole program: "cgroup v1", "cgroup v2" or "polling"

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


@functools.cache
def _cgroup_parents() -> tuple[str, tuple[str, ...]] | None:
    """Where this process's cgroups are, to make one per run below them: ("cgroup v1", (memory
    folder, pids folder)) or ("cgroup v2", (folder,)) where its subtree has both controllers."""
    own, mounts = {}, {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(","):
                    own[c] = path  # "" is the v2 hierarchy
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                fstype, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3].split(",")
                for c in ("memory", "pids", ""):
                    if (fstype == "cgroup" and c in options) or (fstype == "cgroup2" and c == ""):
                        mounts[c] = (fields[3], fields[4])  # the mount's root in the hierarchy, its place
    except (OSError, ValueError, IndexError):
        return None

    def folder(c: str) -> str:
        root, point = mounts[c]
        path = own[c]
        if root != "/" and (path + "/").startswith(root + "/"):  # mounted from inside the hierarchy
            path = path[len(root):]
        return os.path.join(point, path.lstrip("/"))
    if {"memory", "pids"} <= mounts.keys() & own.keys():
        return "cgroup v1", (folder("memory"), folder("pids"))
    if "" in mounts and "" in own:
        try:
            enabled = Path(folder(""), "cgroup.subtree_control").read_text().split()
        except OSError:
            return None
        if {"memory", "pids"} <= set(enabled):
            return "cgroup v2", (folder(""),)
    return None


def _make_cgroup(limits: Limits) -> tuple[str, list[Path]] | None:
    """A fresh cgroup (one folder per hierarchy) with this run's budget; None where none can be
    made (or LATEN_SANDBOX_NO_CGROUP is set): the sandbox then polls instead."""
    where = _cgroup_parents()
    if where is None or os.environ.get("LATEN_SANDBOX_NO_CGROUP", "") not in ("", "0"):
        return None
    kind, parents = where
    name = f"{CGROUP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    made: list[Path] = []
    memory = str(limits.memory_mb << 20)
    try:
        for parent in parents:
            made.append(Path(parent, name))
            made[-1].mkdir()
        if kind == "cgroup v1":
            (made[0] / "memory.limit_in_bytes").write_text(memory)
            if (made[0] / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no escape to swap
                (made[0] / "memory.memsw.limit_in_bytes").write_text(memory)
            (made[1] / "pids.max").write_text(str(limits.processes))
        else:
            (made[0] / "memory.max").write_text(memory)
            if (made[0] / "memory.swap.max").exists():
                (made[0] / "memory.swap.max").write_text("0")
            (made[0] / "memory.oom.group").write_text("1")  # an OOM kill ends the whole sandbox
            (made[0] / "pids.max").write_text(str(limits.processes))
    except OSError:
        _remove_cgroup(made)
        return None
    return kind, made


def _cgroup_events(kind: str, folders: list[Path]) -> tuple[bool, bool]:
    """(an OOM kill happened, the pids limit was hit) in this run's cgroup."""
    def counts(path: Path) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
        except (OSError, ValueError):
            return {}
    memory = counts(folders[0] / ("memory.oom_control" if kind == "cgroup v1" else "memory.events"))
    pids = counts(folders[-1] / "pids.events")
    return memory.get("oom_kill", 0) > 0, pids.get("max", 0) > 0


def _remove_cgroup(folders: list[Path]) -> None:
    """Kill whatever is left in the run's cgroup and remove it (a PID namespace ends
    asynchronously when its init is killed from outside: retry for a while)."""
    for folder in folders:
        for _ in range(300):
            try:
                folder.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # busy
                try:
                    if (folder / "cgroup.kill").exists():
                        (folder / "cgroup.kill").write_text("1")
                    else:
                        for pid in (folder / "cgroup.procs").read_text().split():
                            os.kill(int(pid), signal.SIGKILL)  # only the sandbox's processes are listed
                except (OSError, ValueError):
                    pass
                time.sleep(0.01)


def _verdict(raw: bytes) -> tuple[bool, str] | None:
    """(passed, reason) from the test process's line; None if there is none."""
    word, _, reason = raw.partition(b"\n")[0].partition(b" ")
    if word in (b"PASS", b"FAIL"):
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
    with tempfile.TemporaryDirectory(prefix="laten-sandbox-") as tmp:
        workdir, out, err, root = Path(tmp, "work"), Path(tmp, "stdout"), Path(tmp, "stderr"), Path(tmp, "root")
        workdir.mkdir()
        root.mkdir()
        verdict_r, verdict_w = os.pipe()
        for name in JUDGE_FILES:
            (workdir / name).write_bytes(Path(__file__).with_name(name).read_bytes())
        (workdir / "solution.py").write_text(program.solution, encoding="utf-8")
        job = Path(tmp, "job.json")  # outside the working directory: the solution never sees the tests
        job.write_text(json.dumps({"tests": program.tests, "helpers": program.helpers,
                                   "calls": list(program.entry_points)}), encoding="utf-8")
        error_file = Path(tmp, "setup-error")
        spec = {"workdir": str(workdir), "root": str(root), "visible": list(visible_paths()),
                "error_file": str(error_file), "python": interpreter(), "as_root": as_root,
                "uid": FIRST_UID + slot, "test_uid": FIRST_UID + TEST_UIDS + slot, "timeout_s": limits.timeout_s,
                "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "processes": limits.processes,
                "file_mb": limits.file_mb, "disk_mb": limits.disk_mb, "job": str(job), "judge": str(INIT.parent),
                "verdict_fd": verdict_w, "pass_fds": [verdict_w]}
        cgroup = _make_cgroup(limits)  # removed in the finally below, whatever happens
        budget = cgroup[0] if cgroup else POLLING
        spec.update(cgroups=[str(p) for p in cgroup[1]] if cgroup else [], poll_memory=cgroup is None)
        t0 = time.monotonic()
        try:
            with open(out, "wb") as fo, open(err, "wb") as fe:
                # the interpreter of the programs: the test process runs on in it, in the minimal root
                try:
                    proc = subprocess.Popen([interpreter(), "-I", "-S", str(INIT), json.dumps(spec)],
                                            stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, cwd=tmp,
                                            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                            start_new_session=True, pass_fds=(verdict_w,))
                except OSError as e:
                    raise SandboxUnavailable(f"sandbox: setup failed: cannot start {interpreter()}: {e}") from None
                finally:
                    os.close(verdict_w)
                # init enforces the limit itself; this timer is the backstop. (A wait with a
                # timeout polls, up to 50 ms late: a quarter of a trivial program's time.)
                backstop = threading.Timer(limits.timeout_s + 10, proc.kill)
                backstop.start()
                try:
                    code = proc.wait()
                finally:
                    backstop.cancel()
            raw = _read_available(verdict_r)
            over_memory, over_processes = _cgroup_events(*cgroup) if cgroup else (False, False)
        finally:
            os.close(verdict_r)
            if cgroup:
                _remove_cgroup(cgroup[1])
        seconds = time.monotonic() - t0
        setup_error = error_file.read_text() if error_file.is_file() else ""
        over_memory = over_memory or setup_error.startswith("memory budget")  # the poll's note
        if setup_error and not over_memory:  # only the sandbox's own setup writes this file
            raise SandboxUnavailable(f"sandbox: {setup_error}")
        verdict = _verdict(raw)
        if over_memory:  # whatever the judge saw: some process of the program was killed
            status, detail = "failed", f"memory budget of {limits.memory_mb} MB exceeded ({budget})"
        elif code == TIMED_OUT:
            status, detail = "timeout", f"no verdict within {limits.timeout_s} s"
        elif code == 128 + signal.SIGXCPU:
            status, detail = "timeout", f"over its {limits.cpu_s} s of CPU time"
        elif verdict is None:
            status, detail = "failed", f"no verdict: the process ended first (exit status {code})"
        else:
            status, detail = ("passed" if verdict[0] else "failed"), verdict[1]
        if over_processes:
            detail += f" (it reached its budget of {limits.processes} processes, {budget})"
        return Outcome(status, code, _tail(out, limits.output_chars), _tail(err, limits.output_chars),
                       seconds, detail, budget)


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
