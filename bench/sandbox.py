"""Sandbox throughput: trivial programs per second, this checkout against an earlier revision.

    python bench/sandbox.py [--baseline REV] [--programs 64] [--rounds 3]

The baseline's sandbox.py and sandbox_init.py (and judge.py, where it has one) are taken from
git at REV into a temporary folder and imported beside this checkout's, and the two are timed in
alternating rounds on the same programs, so the ratio is measured side by side in one run.
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
FILES = ("sandbox.py", "sandbox_init.py", "judge.py")


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


def rate(module, n: int) -> float:
    programs = ["assert 1 + 1 == 2\n"] * n
    t0 = time.perf_counter()
    outcomes = module.run_programs(programs, module.Limits(timeout_s=10))
    seconds = time.perf_counter() - t0
    assert all(o.passed for o in outcomes), [o for o in outcomes if not o.passed][:1]
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument("--programs", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from laten_ray.eval import sandbox as current
    with tempfile.TemporaryDirectory(prefix="laten-bench-sandbox-") as tmp:
        baseline = load_revision(args.baseline, Path(tmp))
        rates = {"baseline": [], "current": []}
        for _ in range(args.rounds):
            rates["baseline"].append(rate(baseline, args.programs))
            rates["current"].append(rate(current, args.programs))
    best = {k: max(v) for k, v in rates.items()}
    print(f"{args.programs} trivial programs x {args.rounds} rounds, {os.cpu_count()} in parallel; best round:")
    print(f"  baseline ({args.baseline}): {best['baseline']:.1f} programs/s ({1000 / best['baseline']:.0f} ms each)")
    print(f"  current:  {best['current']:.1f} programs/s ({1000 / best['current']:.0f} ms each)")
    print(f"  current / baseline: {best['current'] / best['baseline']:.2f}x")


if __name__ == "__main__":
    main()
