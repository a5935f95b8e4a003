"""The code sandbox: hostile programs are contained and scored as failures, the rest go on."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from laten_ray.eval.sandbox import Limits, run_programs

REPO = Path(__file__).resolve().parents[1]
LIMITS = Limits(timeout_s=3, cpu_s=3, memory_mb=512, processes=16)


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
        "print([o.status for o in run_programs(progs, Limits(timeout_s=2), workers=2)])\n")
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "/usr/bin/python3", str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['passed', 'failed', 'failed', 'failed', 'timeout']"
    assert (target / "keep.txt").read_text() == "keep"


def test_a_broken_sandbox_is_an_error_not_a_failed_program(monkeypatch):
    from laten_ray.eval import sandbox
    monkeypatch.setattr(sandbox, "interpreter", lambda: "/nonexistent/python3")
    with pytest.raises(sandbox.SandboxUnavailable, match="setup failed: .*nonexistent"):
        sandbox.run_program("print(1)")
