"""What Ray Train costs a study's LoRA arm, side by side on one local Ray cluster (2 CPUs):

1. One sft-lora unit of the demo study (configs/study-demo.yaml, seed 0, budgets 8/32/128: 128
   steps, 3 merged folders), built in a Ray task as the study builds it, with ray.train_workers
   0 (the build task's own loop, as before Ray Train), 1 and 2, in turns, each in a new folder.
2. For docs/ray_train.md, what a Ray Train run and an actor cost to start and to come back after
   a SIGKILL of the process that trains: a TorchTrainer of one worker (FailureConfig) whose loop
   steps every 0.1 s, against an actor with max_restarts, as `laten-target` is.
3. With --study, the demo study of one seed (8 units, 3 of them LoRA arms) with ray.train_workers
   0 and then 1, each on a private local cluster, as bench/study.py runs a study.
4. With --polls, why laten_ray/study/ray_train.py sets the controller's poll interval: a loop of
   32 steps of 50 ms reporting each (ASYNC), under a poll interval of 0.5 s and of POLL_S.

    python bench/ray_train.py [--rounds 2] [--study] [--polls]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(msg) -> tuple[float, dict]:
    import ray

    from laten_ray import entry
    from laten_ray.study.units import build_unit
    t0 = time.perf_counter()
    info = ray.get(ray.remote(build_unit).options(num_cpus=1, runtime_env={"env_vars": entry.worker_env(1)})
                   .remote(msg))
    return time.perf_counter() - t0, info


def lora_units(out: Path, rounds: int) -> None:
    from laten_ray.study.config import load_study
    from laten_ray.study.units import BuildUnit, plan
    print("1. one sft-lora unit of the demo study (128 steps, budgets 8/32/128), built in a Ray task of 1 CPU",
          flush=True)
    print(f"   {'round':>5} {'train_workers':>13} {'build wall':>10} {'train':>7} {'merge':>6} {'fit (Ray Train)':>15}")
    walls: dict[int, list[float]] = {}
    for r in range(rounds):
        for workers in (0, 1, 2):
            study = load_study(REPO / "configs" / "study-demo.yaml",
                               ["seeds=1", f"output_dir={out}", f"ray.train_workers={workers}"])
            unit = next(u for u in plan(study) if u.arm == "sft-lora")
            msg = replace(BuildUnit.of(study, unit, 1), folder=str(out / f"r{r}-w{workers}" / unit.folder.name))
            wall, info = build(msg)
            walls.setdefault(workers, []).append(wall)
            fit = info.get("ray_train", {}).get("fit_s")
            print(f"   {r:>5} {workers:>13} {wall:>9.1f}s {info['train_s']:>6.1f}s {info['merge_s']:>5.1f}s "
                  f"{'-' if fit is None else f'{fit:.1f}s':>15}", flush=True)
    base = sum(walls[0]) / len(walls[0])
    for workers in (1, 2):
        mean = sum(walls[workers]) / len(walls[workers])
        print(f"   train_workers {workers}: {mean:.1f}s a unit on average, {mean - base:+.1f}s against the "
              f"build task's own loop ({base:.1f}s)")


def _train_loop(config: dict) -> None:
    """Appends (pid, start time) to a file at each start, then steps until a flag file appears."""
    import ray.train
    with open(config["starts"], "a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    step = 0
    while not os.path.exists(config["stop"]):
        time.sleep(0.1)
        step += 1
        ray.train.report({"step": step}, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _starts(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    return [(int(p), float(t)) for p, t in (line.split() for line in path.read_text().splitlines())]


def _wait(cond, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError("the bench waited too long")
        time.sleep(0.02)
    return value


def start_and_recovery(out: Path, rounds: int) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from laten_ray.study.ray_train import POLL_S
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_S))  # as the study's runs
    print("2. start, and recovery after a SIGKILL of the process that trains (no model: the frameworks' own part)",
          flush=True)

    @ray.remote(max_restarts=1, num_cpus=1)
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    for r in range(rounds):
        folder = out / f"trainer-{r}"
        folder.mkdir(parents=True)
        starts, stop = folder / "starts", folder / "stop"
        t0 = time.time()
        trainer = TorchTrainer(_train_loop, train_loop_config={"starts": str(starts), "stop": str(stop)},
                               scaling_config=ScalingConfig(num_workers=1),
                               run_config=RunConfig(name=f"bench-{r}", storage_path=str(folder / "ray-train"),
                                                    failure_config=FailureConfig(max_failures=1)))
        fit = threading.Thread(target=trainer.fit)
        fit.start()
        (pid, first), = _wait(lambda: _starts(starts))
        time.sleep(1.0)
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        again = _wait(lambda: _starts(starts)[1:])[0][1]
        stop.touch()
        fit.join()
        trainer_start, trainer_back = first - t0, again - killed

        t0 = time.time()
        actor = Actor.remote()
        pid = ray.get(actor.pid.remote())
        actor_start = time.time() - t0
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        while True:  # calls fail until the restarted actor answers
            try:
                if ray.get(actor.pid.remote()) != pid:
                    break
            except ray.exceptions.RayActorError:
                time.sleep(0.02)
        actor_back = time.time() - killed
        ray.kill(actor, no_restart=True)
        print(f"   round {r}: TorchTrainer start {trainer_start:.1f}s, back {trainer_back:.1f}s after SIGKILL; "
              f"actor start {actor_start:.1f}s, back {actor_back:.1f}s after SIGKILL", flush=True)


def _report_loop(config: dict) -> float:
    import ray.train
    t0 = time.time()
    for step in range(config["steps"]):
        time.sleep(0.05)
        ray.train.report({"step": step}, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    return t0


def polls(out: Path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from laten_ray.study.ray_train import POLL_S
    print("4. 32 steps of 50 ms, each reported (ASYNC): the controller takes one report per poll", flush=True)
    for interval in (0.5, POLL_S):
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(interval)  # read when a run starts
        result = TorchTrainer(_report_loop, train_loop_config={"steps": 32},
                              scaling_config=ScalingConfig(num_workers=1),
                              run_config=RunConfig(name=f"polls-{interval}", storage_path=str(out / "polls"))).fit()
        print(f"   poll every {interval}s: from the loop's start to fit's return "
              f"{time.time() - result.return_value:.1f}s (the steps alone: {32 * 0.05:.1f}s)", flush=True)


def demo_study(out: Path) -> None:
    from bench.study import report, run, shares
    print("3. the demo study, seeds=1 (configs/study-demo.yaml), 2 units at a time", flush=True)
    builds = {}
    for workers in (0, 1):
        folder = out / f"w{workers}"
        wall = run(REPO, REPO / "configs" / "study-demo.yaml", folder, ["seeds=1", f"ray.train_workers={workers}"])
        report(f"   ray.train_workers={workers}", wall, 2, *shares(folder / "demo", wall, 2))
        built = [json.loads(f.read_text()) for f in (folder / "demo" / "arms").glob("*/built.json")]
        builds[workers] = {b["arm"]: b for b in built}
    print(f"   {'arm':22s} {'build, workers 0':>16} {'build, workers 1':>16} {'of which training':>18} "
          f"{'Ray Train run':>14}")
    for arm, b0 in builds[0].items():
        b1 = builds[1][arm]
        fit = b1.get("ray_train", {}).get("fit_s")
        print(f"   {arm:22s} {b0['build_s']:>15.1f}s {b1['build_s']:>15.1f}s {b1.get('train_s', 0):>17.1f}s "
              f"{'-' if fit is None else f'{fit:.1f}s':>14}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--study", action="store_true", help="part 3 only")
    p.add_argument("--polls", action="store_true", help="part 4 only")
    args = p.parse_args()
    if args.study:
        with tempfile.TemporaryDirectory() as tmp:
            demo_study(Path(tmp))
        return
    from laten_ray.ray_session import ray_session
    # a private local cluster (the dashboard on, for Train's state actor, as a study has it); the
    # raylet's lines about the workers part 2 kills stay in Ray's log folder
    with ray_session(None, "laten-bench-ray-train", log_to_driver=False), tempfile.TemporaryDirectory() as tmp:
        if args.polls:
            polls(Path(tmp))
            return
        lora_units(Path(tmp), args.rounds)
        start_and_recovery(Path(tmp), args.rounds)


if __name__ == "__main__":
    main()
