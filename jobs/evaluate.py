"""Evaluate on a Ray cluster: `python -m jobs.evaluate --model DIR --task NAME --data SPEC --out DIR`.

The entry point of `ray job submit ... -- python -m jobs.evaluate ...`. The evaluator actor
(actors/evaluator.py) holds the engine and runs the whole evaluation on its node.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laten_ray import entry
from laten_ray.ray_session import ray_session


def evaluate_on_ray(args) -> int:
    from actors.evaluator import EvaluatorActor
    from laten_ray.eval.evaluate import print_summary, settings_from_args
    from laten_ray.eval.tasks import get_task
    from laten_ray.models import check_spec
    from laten_ray.records import resolve_path

    settings = settings_from_args(args)  # everything checkable is checked before the actor loads the model
    check_spec(args.model)
    get_task(args.task).load(args.data, args.limit)
    data = args.data if args.data.startswith(("hf:", "demo:")) else str(resolve_path(args.data).resolve())
    import ray
    out = str(Path(args.out).expanduser().resolve())
    with ray_session(args.address, "laten-evaluate"):
        gpus = args.num_gpus if args.num_gpus is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
        actor = ray.remote(EvaluatorActor).options(
            name="laten-evaluator", num_cpus=args.num_cpus, num_gpus=gpus,
            runtime_env={"env_vars": entry.worker_env(args.num_cpus)}).remote(settings, args.num_cpus)
        summary = ray.get(actor.evaluate.remote(args.model, args.task, data, out, args.limit))
        ray.kill(actor)
    print_summary(summary, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    from laten_ray.eval.evaluate import add_arguments

    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS, "
                   "which a job has; else a private local one)")
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=None, help="default: 1 if this cluster has a GPU")
    args = p.parse_args(argv)
    return entry.run(lambda: evaluate_on_ray(args))


if __name__ == "__main__":
    sys.exit(main())
