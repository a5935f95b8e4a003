"""Sandbox throughput: programs judged per second, this checkout against an earlier revision.

    python bench/sandbox.py [--baseline REV] [--workload references|trivial] [--rounds 3]

The workload: every HumanEval and MBPP reference solution of data/eval with its tests (664
programs, judged as an evaluation judges them), or 64 trivial programs without tests. The
baseline's sandbox.py and sandbox_init.py (and judge.py, plain.py, where it has them) are taken
from git at REV into a temporary folder and imported beside this checkout's, and the two are
timed in alternating rounds on the same programs, so the ratio is measured side by side in one
run.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FILES = ("sandbox.py", "sandbox_init.py", "judge.py", "plain.py")


def load_revision(rev: str, folder: Path):
    """The sandbox module of revision `rev` (laten_ray/eval/, or laten_ray/ before the move)."""
    for base in ("laten_ray/eval", "laten_ray"):
        for name in FILES:
            shown = subprocess.run(["git", "show", f"{rev}:{base}/{name}"], cwd=REPO, capture_output=True)
            if shown.returncode == 0:
                (folder / name).write_bytes(shown.stdout)
        if (folder / "sandbox.py").is_file():
            break
    else:
        raise SystemExit(f"no sandbox.py at {rev}")
    spec = importlib.util.spec_from_file_location(f"sandbox_{rev}", folder / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses looks its module up
    spec.loader.exec_module(module)
    return module


def workload(name: str) -> list[tuple]:
    """(solution, tests, entry points, helpers) of each program: the references as the tasks
    build them for the judge, or trivial programs."""
    if name == "trivial":
        return [("assert 1 + 1 == 2\n", "", (), "")] * 64
    import json

    from laten_ray.eval.tasks import get_task
    from laten_ray.records import resolve_path
    out = []
    for task in ("humaneval", "mbpp"):
        path = get_task(task).test_data
        rows = [json.loads(line) for line in open(resolve_path(path), encoding="utf-8")]
        for row, item in zip(rows, get_task(task).load(path)):
            solution = row["prompt"] + row["canonical_solution"] if task == "humaneval" else row["code"]
            p = get_task(task).program(solution, item)
            out.append((p.solution, p.tests, p.entry_points, getattr(p, "helpers", "")))
    return out


def rate(module, programs: list[tuple]) -> float:
    """Programs per second; the baseline's Program may know no helpers (its judge ran the tests
    beside the solution, which defined them)."""
    fields = module.Program.__dataclass_fields__
    built = [module.Program(*p[:3], **({"helpers": p[3]} if "helpers" in fields else {})) for p in programs]
    t0 = time.perf_counter()
    outcomes = module.run_programs(built, module.Limits(timeout_s=30))
    seconds = time.perf_counter() - t0
    assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed][:1]
    return len(programs) / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument("--workload", choices=["references", "trivial"], default="references")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from laten_ray.eval import sandbox as current
    programs = workload(args.workload)
    with tempfile.TemporaryDirectory(prefix="laten-bench-sandbox-") as tmp:
        baseline = load_revision(args.baseline, Path(tmp))
        rates = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            rates["baseline"].append(rate(baseline, programs))
            rates["current"].append(rate(current, programs))
    best = {k: max(v) for k, v in rates.items()}
    print(f"{len(programs)} programs ({args.workload}) x {args.rounds} rounds, {os.cpu_count()} in parallel; "
          "best round:")
    print(f"  baseline ({args.baseline}): {best['baseline']:.1f} programs/s ({1000 / best['baseline']:.0f} ms each)")
    print(f"  current:  {best['current']:.1f} programs/s ({1000 / best['current']:.0f} ms each)")
    print(f"  current / baseline: {best['current'] / best['baseline']:.2f}x")
    print(f"  every round, baseline: {', '.join(f'{r:.1f}' for r in rates['baseline'])}; "
          f"current: {', '.join(f'{r:.1f}' for r in rates['current'])}")


if __name__ == "__main__":
    main()
