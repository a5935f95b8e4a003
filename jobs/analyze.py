"""Analyse a pair, or every arm of a study: `python -m jobs.analyze --source DIR --target DIR
--data SPEC --out DIR` or `--study STUDY_DIR` (and `laten analyze`; docs/method.md §11).

Writes analysis.json, analysis.md, cka.png, parametric.png and neurons.png. With `--ray` each model
lives in its own actor (actors/analyzer.py) on the cluster, the two working at once; only Grams,
scores and cosines travel to this driver.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laten_ray import entry
from laten_ray.ray_session import ray_session


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", default=None, help="a study folder (laten study): its pair, data and every trained arm")
    p.add_argument("--source", default=None, help="the source model: HF folder or tiny:NAME")
    p.add_argument("--target", default=None, help="the target model: HF folder or tiny:NAME")
    p.add_argument("--data", default=None, help="examples for the CKA: a data spec (default with --study: its align split)")
    p.add_argument("--limit", type=int, default=None, help="use the first N examples of --data")
    p.add_argument("--extract", default=None, help="examples to locate neurons on (default: the study's or a merged "
                   "LaTen run's extract split, else --data)")
    p.add_argument("--merged", nargs="*", default=[], help="merged or fine-tuned target folders to compare with the "
                   "target (with --study: every trained arm)")
    p.add_argument("--out", default=None, help="output folder (default with --study: STUDY/analysis)")
    p.add_argument("--rate", type=float, default=None, help="K of the neuron overlap (default: the merge's or "
                   "the study's rate, else 0.1)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="both models' dtype (default float32; with --study the study's)")
    p.add_argument("--device", default=None, help="both models' device (default auto; with --study the study's)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass = per minibatch of tokens")
    p.add_argument("--gram-tokens", type=int, default=256, help="answer tokens per Gram piece at most (>= 8)")
    p.add_argument("--chunk-mb", type=int, default=256, help="attribution's memory budget")
    p.add_argument("--ray", action="store_true", help="one Ray actor per model")
    p.add_argument("--address", default=None, help="with --ray: the cluster to join (default: $RAY_ADDRESS, "
                   "which a job has; else a private local one)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="with --ray: CPUs (and torch threads) per actor")
    p.add_argument("--num-gpus", type=float, default=0.0, help="with --ray: GPUs per actor")


def inputs_of(args):
    """(Inputs, Settings, out folder) from the arguments; every user error is raised here,
    before a model loads."""
    from laten_ray.analysis.report import Inputs, Settings, merged_inputs, run_extract
    from laten_ray.models import check_spec
    from laten_ray.records import check_spec as check_data

    settings = Settings(args.max_length, args.batch_size, args.gram_tokens, args.chunk_mb, args.rate)
    if settings.gram_tokens < 8:
        raise ValueError("--gram-tokens must be at least 8 (each piece needs 4 tokens)")
    if args.study:
        from laten_ray.analysis.report import inputs_from_study
        if args.source or args.target:
            raise ValueError("analyze: --study takes the pair from the study; drop --source/--target")
        inputs, rate = inputs_from_study(args.study, args.data, args.limit)
        inputs.merged += merged_inputs(args.merged)
        settings.rate = args.rate or rate
        out = args.out or str(Path(args.study) / "analysis")
    else:
        missing = [f"--{k}" for k in ("source", "target", "data", "out") if not getattr(args, k)]
        if missing:
            raise ValueError(f"analyze: give {', '.join(missing)} (or --study STUDY_DIR)")
        inputs, out = Inputs(args.source, args.target, args.data, args.limit, merged=merged_inputs(args.merged)), args.out
        inputs.extract = run_extract(inputs.merged) or ""  # a LaTen merge's own run: its extract examples
    if args.extract:
        inputs.extract, inputs.extract_limit = args.extract, None
    for role in ("source", "target"):
        check_spec(getattr(inputs, role))
        inputs.dtype[role] = args.dtype or inputs.dtype[role]
        inputs.device[role] = args.device or inputs.device[role]
    for spec in {inputs.data, inputs.extract or inputs.data}:
        check_data(spec)
    return inputs, settings, Path(out)


def on_ray(inputs, settings, address: str | None, num_cpus: float, num_gpus: float, log=print) -> dict:
    """The analysis with each model in its own actor; the actors run each call at the same time."""
    import ray

    from actors.analyzer import AnalyzerActor
    from laten_ray.analysis.report import analyze

    with ray_session(address, "laten-analyze", log):
        remote = ray.remote(AnalyzerActor).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                   runtime_env={"env_vars": entry.worker_env(num_cpus)})
        actors = {role: remote.remote(getattr(inputs, role), inputs.dtype[role], inputs.device[role], num_cpus)
                  for role in ("target", "source")}
        try:
            shapes = tuple(ray.get([actors[r].shape.remote() for r in ("target", "source")]))
            return analyze(inputs, settings, shapes,
                           lambda calls: ray.get([getattr(actors[r], m).remote(*a) for r, m, a in calls]), log)
        finally:
            for actor in actors.values():
                ray.kill(actor)


def run(args, log=print) -> Path:
    from laten_ray.analysis.report import analyze, in_turn, write
    from laten_ray.analysis.side import Side

    inputs, settings, out = inputs_of(args)
    log(f"analysing {inputs.source} -> {inputs.target} on {inputs.data}; output {out}")
    if args.ray:
        results = on_ray(inputs, settings, args.address, args.num_cpus, args.num_gpus, log)
    else:
        sides = {r: Side(getattr(inputs, r), inputs.dtype[r], inputs.device[r]) for r in ("target", "source")}
        results = analyze(inputs, settings, (sides["target"].shape, sides["source"].shape), in_turn(sides), log)
    write(results, out)
    log(f"analysis: {out / 'analysis.md'}")
    return out


def main(argv: list[str] | None = None, prog: str = "python -m jobs.analyze") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return entry.run(lambda: run(args, log=lambda line: print(line, flush=True)) and None)


if __name__ == "__main__":
    sys.exit(main())
