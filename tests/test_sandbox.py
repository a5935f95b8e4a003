"""The code sandbox: hostile programs are contained and scored as failures, the rest go on."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from laten_ray.eval import sandbox
from laten_ray.eval.sandbox import Limits, run_program, run_programs

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(timeout_s=3, cpu_s=3, memory_mb=512, processes=16)
# Programs that end by themselves at once (probes of the filter): room for a loaded machine,
# where starting a second interpreter inside the sandbox can take seconds.
PROBE_LIMITS = Limits(timeout_s=30, cpu_s=10, memory_mb=512, processes=16)
CGROUP = sandbox._cgroup_parents()  # None: this machine bounds a whole program by polling only
if CGROUP and not all(os.access(p, os.W_OK) for p in CGROUP[1]):
    CGROUP = None
# the syscall numbers the probes below call through ctypes
NR = {"x86_64": {"add_key": 248, "keyctl": 250, "clone": 56, "io_uring_setup": 425},
      "aarch64": {"add_key": 217, "keyctl": 219, "clone": 220, "io_uring_setup": 425}}.get(os.uname().machine)
needs_table = pytest.mark.skipif(NR is None, reason="probes know x86_64 and aarch64 syscall numbers only")


def in_fresh_python(code: str) -> str:
    """A program that runs `code` in a new interpreter and passes only if that ends well: the
    containment holds for every process a program starts, not only for the first."""
    return ("import subprocess, sys\n"
            f"done = subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True)\n"
            "print(done.stdout, end='')\nprint(done.stderr, end='', file=sys.stderr)\n"
            "assert done.returncode == 0\n")


def syscall_probe(call: str) -> str:
    """Code that makes a raw syscall through ctypes, prints `errno N` (0: it worked) and fails
    when it was refused. A clone's child leaves at once."""
    return ("import ctypes, os\nparent = os.getpid()\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"result = {call}\n"
            "if result == 0 and os.getpid() != parent:\n    os._exit(0)\n"
            "print('errno', ctypes.get_errno() if result == -1 else 0)\nassert result != -1\n")


def test_hostile_programs_are_contained_while_the_others_pass(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    keep = outside / "keep.txt"
    keep.write_text("keep")
    in_repo = REPO / f".sandbox-probe-{os.getpid()}"
    monkeypatch.setenv("LATEN_TEST_SECRET", "s3cr3t-value")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []

    def accept_loop(stop):  # bounded: stops with the test
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass
    stop = threading.Event()
    thread = threading.Thread(target=accept_loop, args=(stop,), daemon=True)
    thread.start()

    programs = {
        "good": "def add(a, b):\n    return a + b\nassert add(2, 3) == 5\n",
        "wrong": "assert sorted([3, 1]) == [3, 1]\n",
        "infinite loop": "while True:\n    pass\n",
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "memory bomb": "big = bytearray(8 << 30)\n",
        "growing memory bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
        "write outside": f"open({str(outside / 'new.txt')!r}, 'w').write('x')\n"
                         f"open({str(in_repo)!r}, 'w').write('x')\n",
        "delete outside": f"import os, shutil\nos.remove({str(keep)!r})\nshutil.rmtree({str(outside)!r})\n",
        "network": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n",
        "read environment": "import os, glob\nprint(dict(os.environ))\n"
                            "for p in glob.glob('/proc/*/environ'):\n    print(open(p, errors='replace').read())\n"
                            "raise SystemExit('a secret must not be among the above')\n",
        "kill parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n"
                       "os.kill(1, signal.SIGKILL)\nraise SystemExit(3)\n",
        "fake setup failure": "import sys\nprint('sandbox: setup failed: no', file=sys.stderr)\nsys.exit(125)\n",
        "good again": "import math\nassert math.gcd(12, 18) == 6\n",
    }
    try:
        outcomes = dict(zip(programs, run_programs(list(programs.values()), LIMITS, workers=4)))
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    status = {name: o.status for name, o in outcomes.items()}
    assert status["good"] == "passed" and status["good again"] == "passed", (outcomes["good"], outcomes["good again"])
    assert status["wrong"] == "failed" and "AssertionError" in outcomes["wrong"].stderr
    assert status["infinite loop"] == "timeout"
    assert status["fork bomb"] in ("timeout", "failed")
    if CGROUP:  # the cgroup's pids limit stopped it (it counts the sandbox's init too, so it comes first)
        assert outcomes["fork bomb"].budget == CGROUP[0]
        assert "budget of 16 processes" in outcomes["fork bomb"].detail, outcomes["fork bomb"]
    assert status["memory bomb"] == "failed" and "MemoryError" in outcomes["memory bomb"].stderr
    for name in ("fake setup failure", "growing memory bomb", "write outside", "delete outside", "network", "read environment", "kill parent"):
        assert status[name] != "passed", (name, outcomes[name])
    assert keep.read_text() == "keep" and sorted(p.name for p in outside.iterdir()) == ["keep.txt"]
    assert not in_repo.exists()
    assert accepted == []
    assert "s3cr3t-value" not in outcomes["read environment"].stdout
    assert "LATEN_TEST_SECRET" not in outcomes["read environment"].stdout
    # nothing the fork bomb started is still alive
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "main.py" not in ps


@pytest.mark.skipif(os.geteuid() != 0, reason="puts a socket in a folder the sandbox shows, which needs root")
def test_no_unix_socket_of_the_host_is_reachable():
    """socket(AF_UNIX) is refused, so is a datagram socketpair; a stream pair cannot connect."""
    shown = Path(os.path.dirname(sandbox.interpreter()), f".laten-probe-{os.getpid()}")  # bound read-only inside
    assert any(str(shown).startswith(p.rstrip("/") + "/") for p in sandbox.visible_paths())
    shown.mkdir(mode=0o755)
    stream, datagram = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stream.bind(str(shown / "s.sock"))
        stream.listen(4)
        datagram.bind(str(shown / "d.sock"))
        for name in ("s.sock", "d.sock"):
            (shown / name).chmod(0o777)  # anyone may connect: only the sandbox stands in the way
        attack = ("import errno, socket\nout = []\n"
                  "def attempt(make, path):\n    try:\n        make().connect(path)\n        out.append('connected')\n"
                  "    except OSError as e:\n        out.append(errno.errorcode.get(e.errno, e.errno))\n"
                  f"attempt(lambda: socket.socket(socket.AF_UNIX), {str(shown / 's.sock')!r})\n"
                  f"attempt(lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0], {str(shown / 'd.sock')!r})\n"
                  f"attempt(lambda: socket.socketpair()[0], {str(shown / 's.sock')!r})\n"
                  "print(out)\nassert 'connected' in out\n")
        pair = "import socket\na, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'\n"
        hostile, good = run_programs([attack, pair], PROBE_LIMITS, workers=2)
        stream.setblocking(False)
        datagram.setblocking(False)
        with pytest.raises(BlockingIOError):
            stream.accept()
        with pytest.raises(BlockingIOError):
            datagram.recv(16)
    finally:
        stream.close()
        datagram.close()
        shutil.rmtree(shown)
    assert hostile.status == "failed" and "['EPERM', 'EPERM', 'EISCONN']" in hostile.stdout, hostile
    assert good.passed, good


@needs_table
def test_keys_do_not_pass_between_programs():
    """The kernel keyrings are refused: no key to leave behind, none to find."""
    add = syscall_probe(f"libc.syscall({NR['add_key']}, b'user', b'laten-probe', b'secret', 6, ctypes.c_long(-4))")
    find = syscall_probe(f"libc.syscall({NR['keyctl']}, 10, ctypes.c_long(-4), b'user', b'laten-probe', 0)")
    first = run_program(in_fresh_python(add), PROBE_LIMITS, slot=0)
    second = run_program(in_fresh_python(find), PROBE_LIMITS, slot=0)  # the same uid as the first
    good = run_program("assert 2 ** 10 == 1024\n", PROBE_LIMITS, slot=0)
    for outcome in (first, second):
        assert outcome.status == "failed" and "errno 1\n" in outcome.stdout, outcome  # EPERM
    assert good.passed, good


@needs_table
def test_refused_syscalls():
    probes = {
        "vsock": "import errno, socket\ntry:\n    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
                 "except OSError as e:\n    print('errno', e.errno)\n    raise\n",
        "unshare a user namespace": in_fresh_python(syscall_probe("libc.unshare(0x10000000)")),
        "clone into a user namespace": in_fresh_python(syscall_probe(f"libc.syscall({NR['clone']}, 0x10000000 | 17, 0, 0, 0, 0)")),
        "ptrace": in_fresh_python(syscall_probe("libc.ptrace(0, 0, 0, 0)")),  # PTRACE_TRACEME
        "io_uring": in_fresh_python(syscall_probe(f"libc.syscall({NR['io_uring_setup']}, 4, ctypes.create_string_buffer(120))")),
        "memfd": "import os\ntry:\n    os.memfd_create('hidden')\nexcept OSError as e:\n    print('errno', e.errno)\n    raise\n",
        "a larger socket buffer": "import socket\na, b = socket.socketpair()\ntry:\n"
                                  "    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)\n"
                                  "except OSError as e:\n    print('errno', e.errno)\n    raise\n",
        "a larger pipe": "import fcntl, os\nr, w = os.pipe()\ntry:\n    fcntl.fcntl(w, 1031, 1 << 20)\n"
                         "except OSError as e:\n    print('errno', e.errno)\n    raise\n",
        "good": "assert sorted({3, 1, 2}) == [1, 2, 3]\n",
    }
    outcomes = dict(zip(probes, run_programs(list(probes.values()), PROBE_LIMITS, workers=2)))
    for name, outcome in outcomes.items():
        if name == "good":
            assert outcome.passed, outcome
        else:
            assert outcome.status == "failed" and "errno 1\n" in outcome.stdout, (name, outcome)


def test_ordinary_programs_still_pass():
    """What the filter and the budget allow: threads, a fork Pool (pipes, socketpairs, /dev/shm
    semaphores), a subprocess of the interpreter, files in its directory and /tmp."""
    busy = ("import threading, multiprocessing, subprocess, sys, math\n"
            "out = []\nthreads = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]\n"
            "[t.start() for t in threads]\n[t.join() for t in threads]\nassert sorted(out) == [0, 1, 2, 3]\n"
            "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
            "    assert pool.map(math.factorial, range(6)) == [1, 1, 2, 6, 24, 120]\n"
            "a, b = multiprocessing.Pipe()\na.send([1, 2])\nassert b.recv() == [1, 2]\n"
            "assert subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout == '42\\n'\n")
    files = ("import math, os\nopen('mine.txt', 'w').write('a' * 1000)\nopen('/tmp/t.txt', 'w').write('b')\n"
             "assert os.path.getsize('mine.txt') == 1000 and open('/tmp/t.txt').read() == 'b'\n"
             "assert math.isclose(sum(1 / 2 ** i for i in range(60)), 2.0)\n")
    outcomes = run_programs([in_fresh_python(busy), files], PROBE_LIMITS, workers=2)
    assert all(o.passed for o in outcomes), outcomes


def three_children(each_mb: int) -> str:
    """Three processes that each hold `each_mb` of touched memory at once; passes if all did.
    (Fresh interpreters: a fork of the judge, with its threads' arenas, sits near RLIMIT_AS.)"""
    hold = f"import time\nblock = b'x' * ({each_mb} << 20)\ntime.sleep(1)\n"
    return ("import subprocess, sys\n"
            f"children = [subprocess.Popen([sys.executable, '-c', {hold!r}]) for _ in range(3)]\n"
            "assert [c.wait() for c in children] == [0, 0, 0]\n")


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.parametrize("mechanism", ["cgroup", "polling"])
def test_memory_is_bounded_for_the_whole_program(mechanism, monkeypatch):
    """Each of three processes fits RLIMIT_AS, their sum does not fit the budget."""
    if mechanism == "cgroup" and CGROUP is None:
        pytest.skip("no cgroup can be made here")
    if mechanism == "polling":
        monkeypatch.setenv("LATEN_SANDBOX_NO_CGROUP", "1")
    limits = Limits(timeout_s=20, cpu_s=10, memory_mb=128, processes=16)  # room for a loaded machine
    hog, good = (run_program(p, limits) for p in (three_children(int(0.6 * 128)), three_children(8)))
    expected = CGROUP[0] if mechanism == "cgroup" else "polling"
    assert hog.status == "failed" and hog.budget == expected, hog
    assert hog.detail == f"memory budget of 128 MB exceeded ({expected})", hog
    assert hog.seconds < limits.timeout_s
    assert good.passed and good.budget == expected, good


@pytest.mark.skipif(CGROUP is None, reason="no cgroup can be made here")
def test_cgroups_are_removed_after_every_run():
    mine = f"{sandbox.CGROUP_PREFIX}{os.getpid()}-"
    outcomes = run_programs(["print(1)", "while True:\n    pass\n", "import os\nos._exit(3)\n"],
                            Limits(timeout_s=1, cpu_s=2), workers=2)
    assert [o.status for o in outcomes] == ["passed", "timeout", "failed"]
    for parent in CGROUP[1]:
        assert [p for p in os.listdir(parent) if p.startswith(mine)] == []


FILTER_PROBE = """
import ctypes, fcntl, importlib.util, json, os, socket, sys
spec = importlib.util.spec_from_file_location("sandbox_init", sys.argv[1])
init = importlib.util.module_from_spec(spec)
spec.loader.exec_module(init)
init.check(init.libc.prctl(init.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
init.install_filter()
seen = {}
def tried(name, call):
    try:
        call()
        seen[name] = 0
    except OSError as e:
        seen[name] = e.errno
def raw(result):
    if result == -1:
        raise OSError(ctypes.get_errno(), "")
a, b = socket.socketpair()
r, w = os.pipe()
tried("unix socket", lambda: socket.socket(socket.AF_UNIX))
tried("inet socket", lambda: socket.socket(socket.AF_INET).close())
tried("socketpair", lambda: socket.socketpair())
tried("SO_SNDBUF", lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22))
tried("SO_RCVBUFFORCE", lambda: a.setsockopt(socket.SOL_SOCKET, 33, 1 << 22))
tried("SO_KEEPALIVE", lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
tried("F_SETPIPE_SZ", lambda: fcntl.fcntl(w, 1031, 1 << 20))
tried("F_GETFL", lambda: fcntl.fcntl(w, fcntl.F_GETFL))
tried("memfd", lambda: os.memfd_create("hidden"))
tried("unshare a user namespace", lambda: raw(init.libc.unshare(0x10000000)))
tried("ptrace", lambda: raw(init.libc.ptrace(0, 0, 0, 0)))
tried("getpid", lambda: os.getpid())
print(json.dumps(seen))
"""


@needs_table
def test_the_filter_refuses_what_it_lists_and_allows_the_rest():
    """The filter itself, installed in a child of this machine: each refused call gets EPERM,
    its allowed neighbours work."""
    done = subprocess.run([sys.executable, "-c", FILTER_PROBE, str(sandbox.INIT)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    eperm = 1
    assert json.loads(done.stdout) == {
        "unix socket": eperm, "inet socket": 0, "socketpair": 0, "SO_SNDBUF": eperm, "SO_RCVBUFFORCE": eperm,
        "SO_KEEPALIVE": 0, "F_SETPIPE_SZ": eperm, "F_GETFL": 0, "memfd": eperm, "unshare a user namespace": eperm,
        "ptrace": eperm, "getpid": 0}


def test_the_filter_exists_only_where_its_syscall_table_does():
    """Elsewhere the setup fails, so the host raises SandboxUnavailable instead of running bare."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("sandbox_init", sandbox.INIT)
    init = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(init)
    with pytest.raises(OSError, match="no syscall table for ppc64le"):
        init.syscall_filter("ppc64le")


def test_kernel_buffers_count_in_the_polled_budget(monkeypatch):
    """Socket buffers are kernel memory that no process maps: polling, the sandbox counts the
    most that every open socket and pipe can hold, so sixteen processes filling socket pairs
    are stopped at the budget."""
    monkeypatch.setenv("LATEN_SANDBOX_NO_CGROUP", "1")
    flood = ("import os, socket, time\n"
             "for _ in range(4):\n    os.fork()\n"
             "held = []\n"
             "for _ in range(28):\n"
             "    a, b = socket.socketpair()\n    a.setblocking(False)\n"
             "    try:\n        while True:\n            a.send(b'x' * 65536)\n"
             "    except BlockingIOError:\n        pass\n"
             "    held.append((a, b))\n"
             "time.sleep(15)\n")
    outcome = run_program(flood, Limits(timeout_s=20, cpu_s=10, memory_mb=256, processes=32))
    assert outcome.status == "failed" and outcome.detail == "memory budget of 256 MB exceeded (polling)", outcome
    assert outcome.seconds < 15


def test_output_is_truncated_and_file_size_is_limited():
    flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    [outcome] = run_programs([flood], Limits(timeout_s=5, file_mb=1, output_chars=100))
    assert outcome.status == "failed"  # SIGXFSZ at 1 MB of output
    assert len(outcome.stdout) <= 100


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the sandbox as another user, which needs root")
def test_unprivileged_users_get_the_same_containment():
    """As a non-root user the sandbox isolates through a user namespace instead."""
    tmp_path = Path(tempfile.mkdtemp(prefix="laten-sandbox-test-"))  # pytest's tmp is root-only
    try:
        unprivileged_run(tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def unprivileged_run(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    target = tmp_path / "shared"
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    (target / "keep.txt").write_text("keep")
    (target / "keep.txt").chmod(0o666)
    script.write_text(
        "from laten_ray.eval.sandbox import Limits, run_programs\n"
        f"progs = ['assert 1 + 1 == 2', {'import os; os.remove(' + repr(str(target / 'keep.txt')) + ')'!r},\n"
        "         'import socket; socket.create_connection((\"127.0.0.1\", 1), timeout=1)',\n"
        "         'import os, signal; os.killpg(0, signal.SIGKILL); raise SystemExit(3)', 'while True: pass']\n"
        "outcomes = run_programs(progs, Limits(timeout_s=2), workers=2)\n"
        "print([o.status for o in outcomes])\n"
        # no cgroup as an ordinary user here: the poll bounds the memory; the filter works in a user namespace
        f"hog, nested = {three_children(int(0.6 * 128))!r}, {in_fresh_python(syscall_probe('libc.unshare(0x10000000)'))!r}\n"
        "print([(o.detail, o.stdout) for o in run_programs([hog, nested], Limits(timeout_s=4, memory_mb=128), workers=2)])\n"
        "print(outcomes[3].detail)\n")
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "/usr/bin/python3", str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    statuses, budget_and_filter, killer = done.stdout.splitlines()
    assert statuses == "['passed', 'failed', 'failed', 'failed', 'timeout']"
    expected = "[('memory budget of 128 MB exceeded (polling)', ''), ('the solution raised AssertionError: ', 'errno 1\\n')]"
    assert budget_and_filter == expected, done.stdout
    assert (target / "keep.txt").read_text() == "keep"
    # killpg(0) reached only the program's own processes: the test process, same uid here, gave the verdict
    assert killer.startswith("the solution "), done.stdout


def test_a_broken_sandbox_is_an_error_not_a_failed_program(monkeypatch):
    from laten_ray.eval import sandbox
    monkeypatch.setattr(sandbox, "interpreter", lambda: "/nonexistent/python3")
    with pytest.raises(sandbox.SandboxUnavailable, match="setup failed: .*nonexistent"):
        sandbox.run_program("print(1)")


def test_a_program_prints_the_same_set_order_in_every_run():
    """String hashing is seeded (PYTHONHASHSEED=0): a solution that returns list(set(...)) is
    judged the same way every time."""
    probe = "print(hash('laten'), list({'alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta'}))\n"
    first, second = run_programs([probe, probe], LIMITS, workers=2)
    assert first.passed and second.passed and first.stdout == second.stdout, (first, second)
    assert first.stdout.split()[0] == subprocess.run(
        [sys.executable, "-c", "print(hash('laten'))"], env={**os.environ, "PYTHONHASHSEED": "0"},
        capture_output=True, text=True).stdout.strip()
