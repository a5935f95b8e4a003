"""Run a study on Ray: `python -m jobs.study --config FILE.yaml [key=value ...]`.

The entry point of `ray job submit ... -- python -m jobs.study ...` and of `laten study`. The
study is a plan of steps (`study_plan`): build each (arm, seed) in a Ray task with its own
resources, then evaluate each of its budgets on one of a small pool of evaluator actors
(actors/evaluator.py) kept for the whole study. `carry_out` runs the steps whose prerequisites
are done, as many at once as the cluster holds. Finished work is found again by its hash: a
rerun skips it and a killed study (driver or worker) goes on where it stopped. At the end the
report is written (laten_ray/study/report.py).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from laten_ray import entry
from laten_ray.ray_session import ray_session

STATES = ("queued", "running", "done", "failed")


class Gauges:
    """Units (arm, seed) by state on the dashboard's Metrics page: ray_laten_study_arms{study, state}."""

    def __init__(self, study: str):
        from ray.util.metrics import Gauge
        self.study = study
        self.gauge = Gauge("laten_study_arms", "units (arm, seed) of a study by state", tag_keys=("study", "state"))

    def show(self, states: dict) -> None:
        for s in STATES:
            self.gauge.set(sum(1 for v in states.values() if v == s), {"study": self.study, "state": s})


def slots(study) -> int:
    """Steps at once: the config's `ray.parallel`, or as many as the cluster's CPUs and GPUs hold."""
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


@dataclass(frozen=True)
class Step:
    """One piece of a study's plan: build a unit, or evaluate one budget of it."""
    kind: str                 # "build" or "evaluate"
    unit: object              # study.units.Unit
    budget: int | None = None

    @property
    def label(self) -> str:
        if self.kind == "build":
            return self.unit.label
        return self.unit.label + ("" if self.budget is None else f" @{self.budget}")

    def after(self, units) -> list[str]:
        """The labels of the build steps this one waits for."""
        if self.kind == "evaluate":
            return [self.unit.label]
        return [v.label for v in units if v.arm in self.unit.needs and v.seed == self.unit.seed]


def study_plan(units) -> list[Step]:
    """Every unit's build, then the evaluation of each of its budgets."""
    return [step for u in units for step in
            [Step("build", u), *(Step("evaluate", u, b) for b in u.budgets)]]


def run_study(study, address: str | None = None, log=print) -> Path:
    """Carry out every step of the study not done yet, then write the report; returns the study
    folder. `study` was checked by load_study (the workers get it as it is)."""
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
    steps = study_plan(units)
    log(f"study folder: {study_dir} ({len(units)} units, {sum(s.kind == 'evaluate' for s in steps)} evaluations; "
        f"budgets {', '.join(map(str, study.budget_list)) if study.budgets else 'one'})")
    with ray_session(address, f"laten-study-{study.name}", log):
        failed = carry_out(study, units, steps, log)
    report = write_report(study_dir)
    log(report["table"])
    log(f"finding: {report['finding']}")
    log(f"report: {study_dir / 'report.md'}")
    if failed:
        raise RuntimeError(f"{len(failed)} step(s) failed: {', '.join(failed)}; their rows are missing from "
                           f"the report. Fix the cause and run the study again: finished work is kept")
    return study_dir


LOST_RETRIES = 1  # an evaluation whose evaluator actor is lost (not its code's error) runs again once, on a fresh one


def carry_out(study, units, steps: list[Step], log) -> list[str]:
    """Run the steps on the cluster, each once its prerequisites are done, as many at once as
    fit; returns the labels of the steps that failed (or could not run)."""
    import ray

    from actors.evaluator import EvaluatorActor
    from laten_ray.study.arms import ARMS
    from laten_ray.study.units import BuildUnit, build_unit

    r, study_dir = study.ray, study.study_dir
    cache = {"LATEN_ATTRIBUTION_CACHE": str(study_dir / "attribution-cache")}  # each example attributed once
    build = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=2,  # a killed worker's build resumes from disk
                 runtime_env={"env_vars": entry.worker_env(r.num_cpus, **cache)})
    # A build that trains through Ray Train holds no GPU while it waits on the run's workers, which
    # hold them (laten_ray/study/ray_train.py); its CPUs Ray lends them while it waits.
    builds = {False: ray.remote(build_unit).options(**build),
              True: ray.remote(build_unit).options(**{**build, "num_gpus": 0})}
    # The pool's actors take no CPU from Ray's count: the slots below bound the work at once, and a
    # pool that held CPUs would leave none for the builds.
    evaluator = ray.remote(EvaluatorActor).options(
        num_cpus=0, num_gpus=r.eval_num_gpus, max_restarts=1, max_task_retries=1,
        runtime_env={"env_vars": entry.worker_env(r.eval_num_cpus, **cache)})
    settings = {**study.task.evaluation, "engine": study.engine}
    gauges, t0 = Gauges(study.name), time.monotonic()

    def say(step: Step, event: str) -> None:
        log(f"[{time.monotonic() - t0:7.1f}s] {step.label}: {event}")

    info: dict[str, dict] = {}   # unit label -> its built.json
    done: set[str] = set()       # labels of finished steps (builds by unit label, evaluations by theirs)
    failed: dict[str, str] = {}
    lost: list[str] = []         # labels of evaluations whose evaluator was lost, once per loss
    for u in units:
        if built := u.built():
            info[u.label] = built
            done.add(u.label)
    pending = []
    for step in steps:
        if step.kind == "evaluate" and step.unit.label in done and step.unit.evaluated(step.budget):
            done.add(step.label)
        elif step.label not in done:
            pending.append(step)
    if len(done) > 0:
        log(f"{sum(s.kind == 'evaluate' for s in steps) - sum(s.kind == 'evaluate' for s in pending)} "
            "evaluation(s) and their builds done earlier, kept")
    width = slots(study)
    log(f"{width} step(s) at a time")
    flights: dict = {}           # ObjectRef -> (step, actor or None)
    idle: list = []              # evaluator actors free for the next evaluation

    def start(step: Step) -> None:
        if step.kind == "build" and ARMS[step.unit.arm].in_driver:  # nothing to compute: done here
            info[step.unit.label] = build_unit(BuildUnit.of(study, step.unit, 1))
            done.add(step.label)
        elif step.kind == "build":
            if r.eval_num_gpus:  # idle evaluators would keep GPUs a build needs
                while idle:
                    ray.kill(idle.pop())
            task = builds[ARMS[step.unit.arm].ray_train and r.train_workers > 0]
            flights[task.remote(BuildUnit.of(study, step.unit, int(r.num_cpus)))] = (step, None)
            say(step, "building")
        else:
            actor = idle.pop() if idle else evaluator.remote(settings, r.eval_num_cpus)
            ref = actor.evaluate.remote(step.unit.model_path(info[step.unit.label], step.budget), study.task.name,
                                        study.task.eval, str(step.unit.eval_dir(step.budget)), study.task.limit, False)
            flights[ref] = (step, actor)

    def finish(step: Step, result) -> None:
        done.add(step.label)
        if step.kind == "build":
            info[step.label] = result
            say(step, f"built in {result['build_s']:.1f}s")
            return
        lo, hi = result["ci95"]
        note = f" ({result['engine_fallback']}; evaluated with transformers)" if result.get("engine_fallback") else ""
        say(step, f"{result['metric']} {result['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}) on "
                  f"{result['examples']} items in {result['seconds']:.1f}s{note}")

    try:
        while pending or flights:
            for step in list(pending):
                after = step.after(units)
                if any(a in failed for a in after):
                    pending.remove(step)
                    failed[step.label] = f"not run: {', '.join(a for a in after if a in failed)} failed"
                    say(step, failed[step.label])
                elif all(a in done for a in after) and len(flights) < width:
                    pending.remove(step)
                    start(step)
            gauges.show(_unit_states(units, steps, done, failed, flights))
            if not flights:
                if pending and not any(all(a in done for a in s.after(units)) for s in pending):
                    raise RuntimeError(f"study scheduling is stuck: {[s.label for s in pending]} wait on nothing")
                continue
            [ref], _ = ray.wait(list(flights), num_returns=1)
            step, actor = flights.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one step's failure is reported; the others go on
                if actor is not None:
                    ray.kill(actor)
                if (actor is not None and isinstance(e, ray.exceptions.RayActorError) and not e.actor_init_failed
                        and lost.count(step.label) < LOST_RETRIES):
                    # its evaluator was lost (its process died, or Ray dropped it before it
                    # started), not an error of the evaluation: again on a fresh evaluator
                    lost.append(step.label)
                    say(step, f"its evaluator was lost ({_short(e)}); evaluating again")
                    pending.insert(0, step)
                    continue
                failed[step.label] = str(e)
                say(step, f"FAILED ({step.kind}): {_short(e)}")
                continue
            if actor is not None:
                idle.append(actor)
            finish(step, result)
        gauges.show(_unit_states(units, steps, done, failed, flights))
    finally:
        for actor in idle + [a for _, a in flights.values() if a is not None]:
            ray.kill(actor)
    return list(failed)


def _unit_states(units, steps: list[Step], done: set, failed: dict, flights: dict) -> dict[str, str]:
    """Each unit's state for the gauges: failed, done (every step), running (one in flight), queued."""
    running = {step.unit.label for step, _ in flights.values()}
    states = {}
    for u in units:
        mine = [s.label for s in steps if s.unit is u]
        states[u.label] = ("failed" if any(m in failed for m in mine) else "done" if all(m in done for m in mine)
                           else "running" if u.label in running else "queued")
    return states


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:500] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.study", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS, which a "
                   "job has; else a private local one, stopped at the end)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. 'arms=[target,laten]' seeds=1 'budgets=[8,64,512]'")
    args = entry.parse_args(p, argv, "study")

    def run() -> None:
        from laten_ray.study.config import load_study
        study = load_study(args.config, args.overrides)  # every config error fails here, fast
        run_study(study, args.address, log=lambda line: print(line, flush=True))
    return entry.run(run)


if __name__ == "__main__":
    sys.exit(main())
