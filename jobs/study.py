"""Run a study on Ray: `python -m jobs.study --config FILE.yaml [key=value ...]`.

The entry point of `ray job submit ... -- python -m jobs.study ...` and of `laten study`. Every
(arm, seed) is built by a Ray task with its own resources and evaluated by the evaluator actor
(actors/evaluator.py), as many at once as the cluster holds, so a study takes about as long as
its slowest arm. Finished work is found again by its hash: a rerun skips it and a killed study
(driver or worker) goes on where it stopped. At the end the report is written
(laten_ray/study/report.py).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from laten_ray import entry
from laten_ray.ray_session import ray_session

STATES = ("queued", "running", "done", "failed")


class Gauges:
    """Arms by state on the dashboard's Metrics page: ray_laten_study_arms{study, state}."""

    def __init__(self, study: str):
        from ray.util.metrics import Gauge
        self.study = study
        self.gauge = Gauge("laten_study_arms", "units (arm, seed) of a study by state", tag_keys=("study", "state"))

    def show(self, states: dict) -> None:
        for s in STATES:
            self.gauge.set(sum(1 for v in states.values() if v == s), {"study": self.study, "state": s})


def slots(study) -> int:
    """Units at once: the config's `ray.parallel`, or as many as the cluster's CPUs and GPUs hold."""
    import ray
    r = study.ray
    if r.parallel:
        return r.parallel
    have = ray.cluster_resources()
    fits = [have.get("CPU", 1) / max(r.num_cpus, r.eval_num_cpus, 1e-9)]
    need_gpu = max(r.num_gpus, r.eval_num_gpus)
    if need_gpu:
        fits.append(have.get("GPU", 0) / need_gpu)
    return max(1, math.floor(min(fits)))


def run_study(study, address: str | None = None, log=print) -> Path:
    """Build and evaluate every unit not done yet, then write the report; returns the study folder."""
    import yaml

    from jobs.train import absolute_output_dir
    from laten_ray import checkpoint as ckpt
    from laten_ray.study.report import write_report
    from laten_ray.study.units import plan, write_plan

    study.output_dir = str(absolute_output_dir(study.output_dir))
    study_dir = study.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_text(yaml.safe_dump(study.to_dict(), sort_keys=False), study_dir / "study.yaml")
    units = plan(study)
    write_plan(study, units)
    log(f"study folder: {study_dir} ({len(units)} units: {', '.join(u.label for u in units)})")
    with ray_session(address, f"laten-study-{study.name}", log):
        states = _run_units(study, units, log)
    failed = [label for label, s in states.items() if s == "failed"]
    report = write_report(study_dir)
    log(report["table"])
    log(f"report: {study_dir / 'report.md'}")
    if failed:
        raise RuntimeError(f"{len(failed)} unit(s) failed: {', '.join(failed)}; their rows are missing from "
                           f"the report. Fix the cause and run the study again: finished units are kept")
    return study_dir


def _run_units(study, units, log) -> dict[str, str]:
    """Build and evaluate the units on the cluster, as many at once as fit; their final states."""
    import ray

    from actors.evaluator import EvaluatorActor
    from laten_ray.study.arms import ARMS
    from laten_ray.study.units import build_unit

    study_dir = study.study_dir
    cache = {"LATEN_ATTRIBUTION_CACHE": str(study_dir / "attribution-cache")}  # each example attributed once
    r = study.ray
    build = ray.remote(build_unit).options(
        num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=2,  # a killed worker's build resumes from disk
        runtime_env={"env_vars": entry.worker_env(r.num_cpus, **cache)})
    evaluator = ray.remote(EvaluatorActor).options(
        num_cpus=r.eval_num_cpus, num_gpus=r.eval_num_gpus, max_restarts=1, max_task_retries=1,
        runtime_env={"env_vars": entry.worker_env(r.eval_num_cpus, **cache)})
    settings = {**study.task.evaluation, "engine": study.engine}
    tree = study.to_dict()
    gauges = Gauges(study.name)
    t0 = time.monotonic()

    def say(unit, event: str) -> None:
        log(f"[{time.monotonic() - t0:7.1f}s] {unit.label}: {event}")

    states = {u.label: "queued" for u in units}
    info: dict[str, dict] = {}
    for u in units:
        built = u.built()
        if built and u.evaluated():
            states[u.label], info[u.label] = "done", built
            say(u, "done earlier, skipped")
        elif built:
            info[u.label] = built
    flights: dict = {}  # ObjectRef -> (unit, phase, actor)
    width = slots(study)
    log(f"{width} unit(s) at a time")

    def start_eval(u) -> None:
        actor = evaluator.remote(u.model_path(info[u.label]), settings, r.eval_num_cpus)
        ref = actor.evaluate.remote(study.task.name, study.task.eval, str(u.eval_dir), study.task.limit, False)
        flights[ref] = (u, "eval", actor)
        say(u, "evaluating")

    try:
        while any(s in ("queued", "running") for s in states.values()):
            for u in units:
                if sum(1 for s in states.values() if s == "running") >= width:
                    break
                if states[u.label] != "queued":
                    continue
                needs = [v for v in units if v.arm in u.needs and v.seed == u.seed]
                if any(states[v.label] == "failed" for v in needs):
                    states[u.label] = "failed"
                    say(u, f"not run: {', '.join(v.label for v in needs)} failed")
                    continue
                if not all(v.label in info for v in needs):
                    continue
                states[u.label] = "running"
                if u.label not in info and ARMS[u.arm].in_driver:
                    info[u.label] = build_unit(tree, u.arm, u.seed, str(u.folder), {}, u.hash, 1)
                if u.label in info:
                    start_eval(u)
                else:
                    ref = build.remote(tree, u.arm, u.seed, str(u.folder), {k: str(v) for k, v in u.needs.items()},
                                       u.hash, int(r.num_cpus))
                    flights[ref] = (u, "build", None)
                    say(u, "building")
            gauges.show(states)
            if not flights:  # every unit left waits on one that can never finish: a bug, not a hang
                if any(s == "queued" for s in states.values()):
                    raise RuntimeError(f"study scheduling is stuck with {states}")
                continue
            [ref], _ = ray.wait(list(flights), num_returns=1)
            u, phase, actor = flights.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one arm's failure is reported; the others go on
                states[u.label] = "failed"
                say(u, f"FAILED in {phase}: {_short(e)}")
                if actor is not None:
                    ray.kill(actor)
                continue
            if phase == "build":
                info[u.label] = result
                say(u, f"built in {result['build_s']:.1f}s")
                start_eval(u)
            else:
                ray.kill(actor)
                states[u.label] = "done"
                lo, hi = result["ci95"]
                note = f" ({result['engine_fallback']}; evaluated with transformers)" \
                    if result.get("engine_fallback") else ""
                say(u, f"{result['metric']} {result['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}) on "
                       f"{result['examples']} items in {result['seconds']:.1f}s{note}")
        gauges.show(states)
    finally:
        for _, _, actor in flights.values():
            if actor is not None:
                ray.kill(actor)
    return states


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:500] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.study", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS, which a "
                   "job has; else a private local one, stopped at the end)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. 'arms=[target,laten]' seeds=1")
    args = entry.parse_args(p, argv, "study")

    def run() -> None:
        from laten_ray.study.config import load_study
        study = load_study(args.config, args.overrides)  # every config error fails here, fast
        run_study(study, args.address, log=lambda line: print(line, flush=True))
    return entry.run(run)


if __name__ == "__main__":
    sys.exit(main())
