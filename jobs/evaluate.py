"""Evaluate on a Ray cluster: `python -m jobs.evaluate --model DIR --task NAME --data FILE --out DIR`.

The entry point of `ray job submit ... -- python -m jobs.evaluate ...`. An evaluator actor
(`laten-evaluator`) holds the generation engine (vLLM, or transformers) on its GPU and runs the
whole evaluation there, code sandbox included; paths are read and written on that node.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class EvaluatorActor:
    """Holds one engine; evaluates as many task files as it is asked to."""

    def __init__(self, model: str, settings: dict, num_cpus: float):
        import torch

        from laten_ray.engines import engine_from_settings
        torch.set_num_threads(max(1, int(num_cpus)))
        self.model, self.settings = model, settings
        self.engine = engine_from_settings(model, settings)

    def evaluate(self, task: str, data: str, out: str, limit: int | None) -> dict:
        from laten_ray.evaluate import evaluate
        return evaluate(self.model, task, data, out, self.settings, limit, engine=self.engine)


def main(argv: list[str] | None = None) -> int:
    from laten_ray.data import DataError
    from laten_ray.evaluate import add_arguments, print_summary, settings_from_args
    from laten_ray.models import check_spec
    from laten_ray.tasks import get_task

    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--address", default=None, help="Ray cluster (default: the job's, or a new local one)")
    p.add_argument("--num-cpus", type=float, default=1.0)
    p.add_argument("--num-gpus", type=float, default=None, help="default: 1 if this cluster has a GPU")
    args = p.parse_args(argv)
    try:  # everything checkable is checked before the actor loads the model
        settings = settings_from_args(args)
        check_spec(args.model)
        get_task(args.task).load(args.data, args.limit)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"laten: error: {e}", file=sys.stderr, flush=True)
        return 2
    import ray
    if not ray.is_initialized():
        ray.init(address=args.address, namespace="laten-evaluate", log_to_driver=True)
    gpus = args.num_gpus if args.num_gpus is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
    env = {k: os.environ[k] for k in ("LATEN_CACHE", "HF_HOME") if k in os.environ}
    actor = ray.remote(EvaluatorActor).options(
        name="laten-evaluator", num_cpus=args.num_cpus, num_gpus=gpus,
        runtime_env={"env_vars": {**env, "TOKENIZERS_PARALLELISM": "false"}}).remote(
        args.model, settings, args.num_cpus)
    out = str(Path(args.out).expanduser().resolve())
    summary = ray.get(actor.evaluate.remote(args.task, str(Path(args.data).resolve()), out, args.limit))
    print_summary(summary, out)
    ray.kill(actor)
    return 0


if __name__ == "__main__":
    sys.exit(main())
