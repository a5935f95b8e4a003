"""Train on a Ray cluster: `python -m jobs.train --config FILE.yaml [key=value ...]`.

The entry point of `ray job submit ... -- python -m jobs.train ...` and of `laten train --ray`.
This driver only schedules: it holds ObjectRefs, never the slices. The source actor runs up to
`ray.lookahead` extract examples ahead of the target actor; if either dies, Ray restarts it and
the run goes on from the target's last checkpoint, to the same result.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from pathlib import Path

from laten_ray import entry
from laten_ray.ray_session import ray_session

PLACEMENT_TIMEOUT_S = 120
RESTART_TIMEOUT_S = 600  # a restarted actor reloads its model


def absolute_output_dir(out: str) -> Path:
    """An output folder made absolute. A job's working directory is a temporary copy that Ray
    deletes, so there a relative one goes under $LATEN_RUNS_DIR (default ~/laten-runs)."""
    path = Path(out).expanduser()
    if not path.is_absolute():
        in_job_copy = "runtime_resources" in Path.cwd().parts
        root = os.environ.get("LATEN_RUNS_DIR") or (Path.home() / "laten-runs" if in_job_copy else Path.cwd())
        path = Path(root).expanduser() / path
    return path.resolve()


def resolve_output_dir(cfg) -> None:
    cfg.output_dir = str(absolute_output_dir(cfg.output_dir))


def actor_resources(cfg, role: str) -> dict:
    """num_cpus / num_gpus of one actor: the config's, or 1 GPU when the model is on cuda."""
    a = getattr(cfg.ray, role)
    gpus = a.num_gpus if a.num_gpus is not None else (1.0 if getattr(cfg, role).device.startswith("cuda") else 0.0)
    return {"num_cpus": a.num_cpus, "num_gpus": gpus}


class Pipeline:
    """The two actors, their placement group, and the steps in flight between them."""

    def __init__(self, cfg, d_source: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.source import SourceActor
        from actors.target import TargetActor

        self.cfg = cfg
        res = {role: actor_resources(cfg, role) for role in ("source", "target")}
        bundles = [{"CPU": r["num_cpus"], **({"GPU": r["num_gpus"]} if r["num_gpus"] else {})}
                   for r in res.values()]
        self.pg = placement_group(bundles, strategy=cfg.ray.placement_strategy, name=f"laten-{cfg.name}")
        try:
            ray.get(self.pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            from laten_ray.config import ConfigError
            raise ConfigError(f"ray: the cluster has no room for the actors' bundles {bundles} "
                               f"(strategy {cfg.ray.placement_strategy}) after {PLACEMENT_TIMEOUT_S} s; "
                               f"it has {ray.cluster_resources()}; change ray.source / ray.target")
        cfg_dict = cfg.to_dict()

        def options(name: str, bundle: int, role: str) -> dict:
            return {"name": name, "max_task_retries": 0,
                    "runtime_env": {"env_vars": entry.worker_env(res[role]["num_cpus"])},
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, bundle),
                    **res[role]}
        # Direct transport must be enabled on the class itself, not through .options()
        remote = ray.remote(max_restarts=cfg.ray.max_restarts,
                            enable_tensor_transport=cfg.ray.transport != "object_store")
        self.source = remote(SourceActor).options(**options(SourceActor.name, 0, "source")).remote(
            cfg_dict, res["source"]["num_cpus"])
        self.target = remote(TargetActor).options(**options(TargetActor.name, 1, "target")).remote(
            cfg_dict, d_source, res["target"]["num_cpus"])
        self.group = None
        self.pids: dict[str, int] = {}
        self.window: deque = deque()  # (step, target ObjectRef) in flight, oldest first

    def connect(self) -> int:
        """Wait until both actors are up (after a restart too); return the steps already done."""
        import ray
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:  # a restarting actor answers "unavailable" until its __init__ has run
            try:
                source, target = ray.get([self.source.info.remote(), self.target.info.remote()])
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        if self.cfg.ray.transport in ("nccl", "gloo"):  # a restarted actor has left the old group
            from ray.experimental import collective
            if self.group is not None:
                collective.destroy_collective_group(self.group)
            self.group = collective.create_collective_group([self.source, self.target],
                                                            backend=self.cfg.ray.transport)
        pids = {"laten-source": source["pid"], "laten-target": target["pid"]}
        for name, pid in pids.items():
            if self.pids.get(name, pid) != pid:
                print(f"{name} was restarted (process {self.pids[name]} -> {pid})", flush=True)
        self.pids = pids
        self.total = target["total"]
        return target["done"]

    def run(self, done: int, on_step) -> None:
        """Steps `done`.. to the end, keeping up to `lookahead` source results ahead of the target."""
        import ray
        locate = self.source.locate
        if self.cfg.ray.transport != "object_store":
            locate = locate.options(tensor_transport=self.cfg.ray.transport.upper())
        nxt = done
        last = time.perf_counter()
        while done < self.total:
            while nxt < self.total and nxt <= done + self.cfg.ray.lookahead:
                sent = locate.remote(nxt)  # an ObjectRef: Ray hands it to the target directly
                self.window.append((nxt, self.target.step.remote(nxt, sent, nxt - done)))
                nxt += 1
            step, ref = self.window[0]
            metrics = ray.get(ref)
            self.window.popleft()
            now = time.perf_counter()
            metrics["wall_s"], last = now - last, now
            done = step + 1
            on_step(metrics)
        ray.get(self.target.flush.remote())  # the last checkpoint is written in the background

    def drain(self) -> None:
        """After a failure: let the steps still queued finish or fail. A step that still runs
        is the one the target expects (it computes what the retry would); the others fail."""
        import ray
        while self.window:
            try:
                ray.get(self.window.popleft()[1])
            except Exception:  # noqa: BLE001 - consumed on purpose: the run resumes from the checkpoint
                pass

    def close(self) -> None:
        import ray
        for actor in (self.source, self.target):
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(self.pg)


def train_on_ray(cfg, address: str | None = None, on_step=None) -> Path:
    """Run the whole training job on a Ray cluster: the one at `address` or $RAY_ADDRESS, else a
    private local one (laten_ray/ray_session.py)."""
    from laten_ray.arch import shape_of
    from laten_ray.models import read_model_config
    from laten_ray.train import prepare_run_dir

    resolve_output_dir(cfg)
    run_dir = prepare_run_dir(cfg)  # a clash with an earlier run's config fails here, before Ray
    d_source = shape_of(read_model_config(cfg.source.model)).hidden
    with ray_session(address, f"laten-{cfg.name}"):
        print(f"run folder: {run_dir}", flush=True)
        _train_pipeline(cfg, d_source, on_step or (lambda m: None))
    return run_dir


def _train_pipeline(cfg, d_source: int, on_step) -> None:
    """The steps on the actors, through restarts of either, until the last one is done."""
    from ray.exceptions import ObjectLostError, OwnerDiedError, RayActorError

    pipeline = Pipeline(cfg, d_source)
    recoveries = 0
    limit = 2 * cfg.ray.max_restarts  # each actor may use all of its restarts
    try:
        done = pipeline.connect()
        if done:
            print(f"resuming at step {done + 1}/{pipeline.total}", flush=True)
        while True:
            try:
                pipeline.run(done, on_step)
                break
            except (RayActorError, ObjectLostError, OwnerDiedError) as e:
                recoveries += 1
                if recoveries > limit:
                    raise
                print(f"an actor failed ({type(e).__name__}); waiting for its restart, then resuming "
                      f"from the last checkpoint (recovery {recoveries}/{limit})", flush=True)
                pipeline.drain()
                done = pipeline.connect()
                print(f"resuming at step {done + 1}/{pipeline.total}", flush=True)
    finally:
        pipeline.close()


def progress_line(m: dict) -> str:
    from laten_ray.train import format_progress
    return (f"{format_progress(m)}  waited {m.get('slice_wait_s', 0):.2f}s  "
            f"checkpoint {m.get('checkpoint_s', 0):.2f}s  wall {m['wall_s']:.2f}s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join (default: $RAY_ADDRESS, which a job has; else a private local one)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4 ray.lookahead=4")
    args = entry.parse_args(p, argv, "train")

    def run() -> None:
        from laten_ray.checks import load_checked
        cfg = load_checked(args.config, args.overrides)  # every config error fails here, fast
        run_dir = train_on_ray(cfg, args.address, on_step=lambda m: print(progress_line(m), flush=True))
        print(f"done: {run_dir}", flush=True)
    return entry.run(run)


if __name__ == "__main__":
    sys.exit(main())
