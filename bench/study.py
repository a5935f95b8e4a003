"""The demo study before and after a change, side by side in one run: the same study config run
by an earlier revision of this repository (a git worktree) and by the working tree, each in a
fresh study folder on its own local Ray cluster, one after the other on the same machine.

Prints each wall time, the time per unit (wall time x steps at once / units) and where the
units' time went: training, merging, evaluation (inside the evaluators) and the rest (Ray
workers and actors starting, models loading, idle slots). Then the current demo study as it is.

    python bench/study.py [--before REV] [--config CONFIG_OF_THE_EARLIER_REVISION]
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


def run(repo: Path, config: Path, out: Path, overrides: list[str]) -> float:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.study", "--config", str(config), "--address", "local",
                    f"output_dir={out}", *overrides], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def shares(study_dir: Path, wall: float, width: int) -> tuple[dict, int, int]:
    """Seconds of training, merging and evaluation summed over the units, the rest of the slots'
    time (width x wall), and the numbers of units and evaluations. Reads both plan layouts (one
    evaluation per unit before budgets, `evals` per budget after)."""
    plan = json.loads((study_dir / "plan.json").read_text())
    total = {"train": 0.0, "merge": 0.0, "evaluate": 0.0}
    evaluations = 0
    for u in plan["units"]:
        built = json.loads((study_dir / u["folder"] / "built.json").read_text())
        total["train"] += built.get("train_s", 0.0)
        total["merge"] += built.get("merge_s", 0.0)
        for ev in (u["evals"].values() if "evals" in u else [u["eval"]]):
            total["evaluate"] += json.loads((study_dir / ev / "summary.json").read_text())["seconds"]
            evaluations += 1
    total["other (workers, loading, idle slots)"] = max(0.0, width * wall - sum(total.values()))
    return total, len(plan["units"]), evaluations


def report(name: str, wall: float, width: int, parts: dict, units: int, evaluations: int) -> None:
    print(f"{name}: {wall:7.1f} s wall, {units} units, {evaluations} evaluations, {width} at a time: "
          f"{width * wall / units:5.1f} s per unit", flush=True)
    for part, seconds in parts.items():
        print(f"    {part:40s} {seconds:7.1f} s  {100 * seconds / (width * wall):5.1f}%  "
              f"({seconds / units:5.1f} s per unit)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="866770b", help="the earlier revision (default: before issue 21)")
    p.add_argument("--config", default="configs/study-demo.yaml",
                   help="the study config, as the earlier revision has it (run by both)")
    args = p.parse_args()
    width = min(2, len(os.sched_getaffinity(0)))  # the demo config's arms at once on this machine
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            config = before / args.config
            walls = {}
            for name, repo in ((f"before ({args.before})", before), ("after (working tree)", REPO)):
                out = Path(tmp) / name.split()[0]
                walls[name] = run(repo, config, out, [])
                layout = "evals" in json.loads((out / "demo" / "plan.json").read_text())["units"][0]
                assert layout == (repo == REPO), f"{name} ran the other tree's code"  # its workers too
                report(name, walls[name], width, *shares(out / "demo", walls[name], width))
            b, a = walls.values()
            print(f"after / before wall time, the same study: {a / b:.2f}x ({args.config} of {args.before})")
            out = Path(tmp) / "now"
            wall = run(REPO, REPO / "configs" / "study-demo.yaml", out, [])
            report("the demo study now (configs/study-demo.yaml, with its budgets)", wall, width,
                   *shares(out / "demo", wall, width))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)], capture_output=True)


if __name__ == "__main__":
    main()
