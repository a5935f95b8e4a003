"""The demo study sequential (one unit at a time) and parallel (as many as the cluster's CPUs
hold), side by side in one run, each in a fresh study folder on its own local Ray cluster.

Prints both wall times and their ratio, and where the units' time went: training, merging,
evaluation (inside the evaluator), and the rest (Ray workers and actors starting, models
loading), summed over the units.

    python bench/study.py [--config configs/study-demo.yaml] [--seeds 3] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: str, out: Path, overrides: list[str]) -> float:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.study", "--config", config, "--address", "local",
                    f"output_dir={out}", *overrides],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def shares(study_dir: Path, wall: float, width: int) -> dict:
    """Seconds of training, merging and evaluation summed over the units, and the rest of the
    slots' time (width x wall)."""
    plan = json.loads((study_dir / "plan.json").read_text())
    total = {"train": 0.0, "merge": 0.0, "evaluate": 0.0}
    for u in plan["units"]:
        built = json.loads((study_dir / u["folder"] / "built.json").read_text())
        summary = json.loads((study_dir / u["eval"] / "summary.json").read_text())
        total["train"] += built.get("train_s", 0.0)
        total["merge"] += built.get("merge_s", 0.0)
        total["evaluate"] += summary["seconds"]
    total["other (workers, loading, idle slots)"] = max(0.0, width * wall - sum(total.values()))
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/study-demo.yaml")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for name, width in (("sequential", 1), ("parallel", cpus)):
            out = Path(tmp) / name
            wall = run(args.config, out, [*args.overrides, f"ray.parallel={width}"])
            study_dir = next(d for d in out.iterdir() if d.is_dir())
            results[name] = (wall, shares(study_dir, wall, width))
            print(f"{name:10s} ({width} unit(s) at a time): {wall:7.1f} s", flush=True)
            for part, seconds in results[name][1].items():
                print(f"    {part:40s} {seconds:7.1f} s  {100 * seconds / (width * wall):5.1f}%")
    ratio = results["parallel"][0] / results["sequential"][0]
    print(f"parallel / sequential wall time: {ratio:.2f}x on {cpus} CPUs ({' '.join(args.overrides) or 'the config as it is'})")


if __name__ == "__main__":
    main()
