"""A study's report, computed from the kept per-item results alone (docs/method.md §10), so
`laten report STUDY_DIR` rebuilds it exactly: report.md, results.json, the figures
(figures.py) and disagreements.md in the study folder.

Statistics: every arm, at every budget, is compared with `target` on the same items. A run
(arm, seed, budget) scores each item 0/1 (or its fraction of passing samples); its interval is
Wilson's (normal for fractions). An arm's row at a budget averages its seeds per item: mean and
std over seeds, the interval of the per-item means, the paired difference from the target with
a paired-bootstrap interval (10,000 resamples over items, seed 0), a p-value (exact McNemar for
one seed's 0/1 scores, else a paired sign-flip permutation test on the per-item seed means),
Holm-adjusted across the rows compared, and the minimum detectable difference at 80% power
(stats.mdd_mcnemar / mdd_paired).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import yaml

from .. import checkpoint as ckpt
from ..eval.evaluate import check_comparable
from ..eval.stats import compare, holm, mdd_mcnemar, mdd_paired
from ..eval.tasks import interval95
from ..records import read_records
from .arms import largest_budget
from .units import BUILT, PLAN

ALPHA, POWER = 0.05, 0.8
CONTROLS = ("laten-noise-source", "laten-random-neurons")
BASELINE = "sft-lora"


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in read_records(str(path))]  # a bad line is an error naming it


def _budget(key: str) -> int | None:
    return None if key == "-" else int(key)


def load(study_dir: Path) -> dict:
    """The plan and, per unit, its build record and per budget its evaluation summary and
    per-item records (None where not finished)."""
    plan = json.loads((study_dir / PLAN).read_text(encoding="utf-8"))
    for u in plan["units"]:
        u["label"] = u["arm"] if u["seed"] is None else f"{u['arm']} seed {u['seed']}"
        built = study_dir / u["folder"] / BUILT
        u["built"] = json.loads(built.read_text(encoding="utf-8")) if built.is_file() else None
        if u["built"] and u["built"].get("hash") != u["hash"]:
            u["built"] = None
        u["merges"] = {}  # budget key -> laten_merge.json of a merged arm (what the merge added)
        for key, model in ((u["built"] or {}).get("models") or {}).items():
            merged = study_dir / u["folder"] / model / "laten_merge.json"
            if merged.is_file():
                u["merges"][key] = json.loads(merged.read_text(encoding="utf-8"))
        u["runs"] = {}
        for key, folder in u.get("evals", {"-": u.get("eval")}).items():  # "eval": a study of before budgets
            ev = study_dir / folder
            done = u["built"] is not None and (ev / "summary.json").is_file() and (ev / "examples.jsonl").is_file()
            u["runs"][key] = {"summary": json.loads((ev / "summary.json").read_text(encoding="utf-8")),
                              "records": _read_jsonl(ev / "examples.jsonl")} if done else None
    return plan


def _scores(records: list[dict], ids: list[str]) -> np.ndarray:
    """Per item (in `ids` order): the fraction of its samples judged correct. [N]"""
    by_id = {r["id"]: r for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"evaluations cover different items (missing {missing[:3]}...)")
    return np.array([sum(by_id[i]["correct"]) / len(by_id[i]["correct"]) for i in ids])


def _paired(base: np.ndarray, other: np.ndarray, seeds: int) -> dict:
    """`other` against `base` on the same items, with the test named and its minimum detectable
    difference."""
    p = compare(base, other)
    n = int(base.size)
    if p.p_mcnemar is not None:
        test = "exact McNemar on paired items"
        mdd = mdd_mcnemar(n, (p.only_a + p.only_b) / n, ALPHA, POWER)
    else:
        test = ("paired sign-flip permutation test on per-item means over "
                f"{seeds} seeds" if seeds > 1 else "paired sign-flip permutation test on per-item scores")
        mdd = mdd_paired(n, float(np.std(other - base, ddof=1)) if n > 1 else 0.0, ALPHA, POWER)
    return {"difference": p.difference, "ci95": list(p.ci95), "base_only": p.only_a, "arm_only": p.only_b,
            "p": p.p, "test": test, "mdd": mdd}


def _holm_into(rows: list[dict], key: str) -> None:
    found = [r[key] for r in rows if r.get(key)]
    for r, adjusted in zip(found, holm([c["p"] for c in found])):
        r["p_holm"] = adjusted
        r["verdict"] = ("no detectable difference" if adjusted >= ALPHA else
                        "higher" if r["difference"] > 0 else "lower")


def _digest(scores: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float64).tobytes()).hexdigest()[:16]


def compute(plan: dict) -> dict:
    """results.json's content: everything but times is a function of the per-item results."""
    target = next((u for u in plan["units"] if u["arm"] == "target"), None)
    base_run = (target or {}).get("runs", {}).get("-")
    if base_run is None:
        raise ValueError("the target arm has no results yet; nothing can be compared")
    ids = [r["id"] for r in base_run["records"]]
    base = _scores(base_run["records"], ids)
    budgets = plan.get("budgets", [None])
    arms, runs = [], []
    per_item: dict[tuple, np.ndarray] = {}  # (arm, budget) -> per-item seed mean [N]
    for arm in dict.fromkeys(u["arm"] for u in plan["units"]):
        mine = [u for u in plan["units"] if u["arm"] == arm]
        for key in mine[0]["runs"]:
            done = [(u, u["runs"][key]) for u in mine if u["runs"].get(key)]
            if not done:
                continue
            budget = _budget(key)
            arm_runs = []
            for u, run in done:
                try:  # a comparison is paired on the same items, made the same way
                    check_comparable(base_run["summary"], run["summary"])
                except ValueError as e:
                    raise ValueError(f"{u['label']} @{key} against the target: {e}") from None
                s = _scores(run["records"], ids)
                lo, hi = interval95(s.tolist())
                arm_runs.append({"arm": arm, "seed": u["seed"], "budget": budget, "score": float(s.mean()),
                                 "ci95": [lo, hi], "hash": u["hash"], "folder": u["folder"], "items": _digest(s),
                                 "vs_target": None if arm == "target" else _paired(base, s, 1)})
            runs += arm_runs
            mean = np.mean([_scores(run["records"], ids) for _, run in done], axis=0)  # [N] seed mean per item
            per_item[arm, budget] = mean
            seed_scores = [r["score"] for r in arm_runs]
            lo, hi = interval95(mean.tolist())
            arms.append({"arm": arm, "budget": budget, "seeds": [u["seed"] for u, _ in done],
                         "score": float(mean.mean()), "std": float(np.std(seed_scores, ddof=1)) if len(done) > 1 else 0.0,
                         "ci95": [lo, hi], "seed_scores": seed_scores, "items": _digest(mean),
                         "vs_target": None if arm == "target" else _paired(base, mean, len(done))})
    _holm_into(arms, "vs_target")
    _holm_into(runs, "vs_target")
    for a in arms:  # the controls and baselines against LaTen at the same budget
        if a["arm"] not in ("target", "source", "laten") and ("laten", a["budget"]) in per_item:
            a["vs_laten"] = _paired(per_item["laten", a["budget"]], per_item[a["arm"], a["budget"]], len(a["seeds"]))
    _holm_into(arms, "vs_laten")
    curves = {}
    for a in arms:
        if a["budget"] is not None:
            curves.setdefault(a["arm"], []).append({"budget": a["budget"], "score": a["score"], "ci95": a["ci95"],
                                                    "seed_scores": a["seed_scores"]})
    s = base_run["summary"]
    missing = [f"{u['label']}" + ("" if k == "-" else f" @{k}") for u in plan["units"]
               for k, run in u["runs"].items() if run is None]
    timing = {u["label"]: {"build_s": (u["built"] or {}).get("build_s"),
                           "train_s": (u["built"] or {}).get("train_s"),
                           "eval_s": sum((r or {}).get("summary", {}).get("seconds", 0.0) for r in u["runs"].values()),
                           "evaluations": sum(r is not None for r in u["runs"].values()),
                           "hardware": (u["built"] or {}).get("hardware")} for u in plan["units"]}
    results = {"study": plan["study"], "task": s["task"], "eval": plan["data"]["eval"], "items": len(ids),
               "metric": s["metric"], "protocol": s.get("protocol"), "sampling": s.get("sampling"),
               "engine": s.get("engine"), "budgets": budgets, "arms": arms, "runs": runs, "curves": curves,
               "missing": missing, "models": plan["models"], "data": plan["data"], "config": plan["config"],
               "timing": timing, "alpha": ALPHA, "power": POWER}
    results["merges"] = merges(plan)
    results["finding"] = finding(results)
    return results


def merges(plan: dict) -> list[dict]:
    """Per merged arm and budget: the share of the trained delta in the saved weights (mean and
    lowest over seeds) and the mean Jaccard of the merge's neurons with training's."""
    rows: dict[tuple, list[dict]] = {}
    for u in plan["units"]:
        for key, m in u["merges"].items():
            if m.get("delta_survival"):
                rows.setdefault((u["arm"], _budget(key)), []).append(m)
    out = []
    for (arm, budget), ms in rows.items():
        survival = [m["delta_survival"]["all"] for m in ms]
        overlap = [np.mean([v["mean"] for v in m["training_overlap"].values()]) for m in ms]
        out.append({"arm": arm, "budget": budget, "seeds": len(ms), "locate": ms[0].get("locate"),
                    "dtype": ms[0].get("dtype"), "delta_survival": float(np.mean(survival)),
                    "delta_survival_min": float(min(survival)), "training_overlap": float(np.mean(overlap))})
    return out


def _row(results: dict, arm: str, budget) -> dict | None:
    return next((a for a in results["arms"] if a["arm"] == arm and a["budget"] == budget), None)


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100 * x + 0.0:+.1f}".replace("-0.0", "+0.0")  # no "-0.0"


def finding(results: dict) -> str:
    """The report's first sentence: which arms beat the target at the largest budget and by how
    much, and LaTen against the target, its controls and the equal-data baseline."""
    top = max((b for b in results["budgets"] if b is not None), default=None)
    at = f"After {top} training steps" if top is not None else "After training"
    rows = [a for a in results["arms"] if a["budget"] == top and a["vs_target"] and a["arm"] != "source"]
    better = [a for a in rows if a["vs_target"]["verdict"] == "higher"]
    worse = [a for a in rows if a["vs_target"]["verdict"] == "lower"]
    ends = ", ".join(f"the {r} scores {_pts(a['score'])}%" for r in ("target", "source") if (a := _row(results, r, None)))
    parts = []
    if better:
        parts.append(f"{at} ({ends}), " + ", ".join(
            f"{a['arm']} beats the target by {_signed(a['vs_target']['difference'])} points (95% CI "
            f"{_pts(a['vs_target']['ci95'][0])} to {_pts(a['vs_target']['ci95'][1])}, p {a['vs_target']['p_holm']:.2g})"
            for a in better))
    else:
        parts.append(f"{at} ({ends}), no trained arm beats the target")
    if worse:
        parts.append("below it: " + ", ".join(f"{a['arm']} ({_signed(a['vs_target']['difference'])})" for a in worse))
    laten = _row(results, "laten", top)
    if laten:
        c = laten["vs_target"]
        if c["verdict"] == "higher":
            parts.append(f"LaTen gains {_signed(c['difference'])} points")
        elif c["verdict"] == "lower":
            parts.append(f"LaTen is {_signed(c['difference'])} points below the target")
        else:
            parts.append(f"LaTen shows no detectable gain ({_signed(c['difference'])} points; the study rules out a "
                         f"gain larger than {_pts(c['mdd'])} points at {int(POWER * 100)}% power)")
        controls = [a for a in (_row(results, n, top) for n in CONTROLS) if a and a.get("vs_laten")]
        if controls:
            beaten = [a["arm"] for a in controls if a["vs_laten"]["verdict"] == "lower"]
            parts.append("it beats its controls " + ", ".join(beaten) if len(beaten) == len(controls) else
                         "it does not beat its controls " + ", ".join(a["arm"] for a in controls if a["arm"] not in beaten))
        sft = _row(results, BASELINE, top)
        if sft and sft.get("vs_laten"):
            d = -sft["vs_laten"]["difference"]
            v = sft["vs_laten"]["verdict"]
            word = ("is below" if v == "higher" else "is above" if v == "lower" else "is not distinguishable from")
            parts.append(f"and it {word} the equal-data baseline {BASELINE} ({_signed(d)} points, p "
                         f"{sft['vs_laten']['p_holm']:.2g})")
    return "; ".join(parts) + "."


# --- files -----------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def _verdict(c: dict) -> str:
    if c["verdict"] == "no detectable difference":
        return f"no detectable difference; rules out a gain > {_pct(c['mdd'])}"
    return c["verdict"]


def _diff(c: dict | None) -> list[str]:
    if not c:
        return ["", "", "", "", ""]
    return [f"{100 * c['difference']:+.1f}", _ci(c["ci95"]), f"{c['p_holm']:.3g}", _pct(c["mdd"]), _verdict(c)]


def _collapse(rows: list[dict], name) -> list[tuple[str, dict]]:
    """Rows with identical per-item results (same `items` digest, same budget) as one row whose
    name lists them all, in first-seen order: (names, the first row)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["items"], r["budget"]), []).append(r)
    return [(", ".join(name(r) for r in g), g[0]) for g in groups.values()]


def _budget_text(b) -> str:
    return "-" if b is None else str(b)


def main_table(results: dict) -> str:
    lines = ["| arm(s) | budget (steps) | seeds | score % (mean ± std) | 95% CI | vs target (points) | paired 95% CI "
             "| p (Holm) | MDD (points) | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for names, a in _collapse(results["arms"], lambda r: r["arm"]):
        seeds = "-" if a["seeds"] == [None] else ",".join(str(s) for s in a["seeds"])
        spread = f" ± {_pct(a['std'])}" if len(a["seeds"]) > 1 else ""
        lines.append("| " + " | ".join([names, _budget_text(a["budget"]), seeds, _pct(a["score"]) + spread,
                                        _ci(a["ci95"]), *_diff(a["vs_target"])]) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    cfg, sampling, protocol = results["config"], results["sampling"] or {}, results["protocol"] or {}
    tests = sorted({a["vs_target"]["test"] for a in results["arms"] if a["vs_target"]})
    schedule = (cfg.get("laten") or {}).get("train") or {}
    budgets = [b for b in results["budgets"] if b is not None]
    out = [f"# Study `{results['study']}`: did the transfer work?", "", f"**Finding.** {results['finding']}", "",
           f"Task **{results['task']}** on `{results['eval']['spec']}` ({results['items']} items, the same for every "
           f"arm), metric {results['metric']}; protocol: chat format {protocol.get('format')}, {protocol.get('shots', 0)} "
           f"shot(s), {protocol.get('mode')}; sampling: temperature {sampling.get('temperature')}, max_tokens "
           f"{sampling.get('max_tokens')}, n {sampling.get('n')}; engine {results['engine']}.", ""]
    if budgets:
        out += [f"Budgets: every trained arm trains once per seed to {max(budgets)} steps and is evaluated after "
                f"{', '.join(map(str, budgets))} steps. "
                + ("Its learning rate warms up, then stays constant (`train.schedule: constant`), so the model after "
                   "B steps is the model a run of B steps gives (tests/test_study.py checks it)."
                   if len(budgets) > 1 else f"Schedule: {schedule.get('schedule', 'one-cycle')}."), ""]
    if results["curves"]:
        out += ["![Learning curves: score against training steps per arm](curves.png)", ""]
    out += [main_table(results), "",
            "Score: the arm's mean per-item score in percent, averaged over its seeds (± their std). 95% CI: "
            "Wilson's interval for one seed's 0/1 scores, else the normal interval of the per-item seed means. "
            "vs target: the paired difference in points on the same items; its interval is a paired bootstrap "
            "over items (10,000 resamples). Several seeds are combined by averaging each item's score over them. "
            f"p: {' / '.join(tests) or 'none'}, Holm-adjusted across every row compared with the target; the verdict "
            f"calls a difference only where the adjusted p < {ALPHA}. MDD: the minimum detectable difference, the "
            f"smallest gain this many items detect with {int(POWER * 100)}% power at alpha {ALPHA} (for paired 0/1 "
            "items Connor's 1987 McNemar formula, else the normal approximation of Miller 2024 for paired "
            "differences; each with the observed spread of the differences, or that of a gain made of "
            "improvements only if larger); a null result rules out gains above it. Arms whose items came out "
            "identical share one row.", "", "![Scores at each arm's largest budget](scores.png)", ""]
    if results["missing"]:
        out += [f"**Missing** (not finished or failed, left out of every number): {', '.join(results['missing'])}.", ""]
    out += ["## Per seed", "", "Runs with identical per-item results share a row.", "",
            "| run(s) | budget | score % | 95% CI | vs target (points) | paired 95% CI | "
            "items only target / only arm right | test | p | p (Holm) | MDD |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for names, r in _collapse(results["runs"], lambda r: r["arm"] + ("" if r["seed"] is None else f" s{r['seed']}")):
        c = r["vs_target"]
        tail = [""] * 7 if not c else [
            f"{100 * c['difference']:+.1f}", _ci(c["ci95"]), f"{c['base_only']} / {c['arm_only']}", c["test"],
            f"{c['p']:.3g}", f"{c['p_holm']:.3g}", _pct(c["mdd"])]
        out.append("| " + " | ".join([names, _budget_text(r["budget"]), _pct(r["score"]), _ci(r["ci95"]), *tail]) + " |")
    against = [a for a in results["arms"] if a.get("vs_laten")]
    if against:
        out += ["", "## Against LaTen", "",
                "At each budget: if `laten-noise-source` or `laten-random-neurons` scores like `laten`, what LaTen "
                "gained did not come from the source's knowledge or from the located neurons; `sft-lora` is what "
                "the same examples give without a source.", "",
                "| arm(s) | budget | vs laten (points) | paired 95% CI | p (Holm) | MDD (points) | verdict |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for names, a in _collapse(against, lambda r: r["arm"]):
            out.append("| " + " | ".join([names, _budget_text(a["budget"]), *_diff(a["vs_laten"])]) + " |")
    if results["merges"]:
        out += ["", "## What the merges added", "",
                "Delta survival: the share of the trained delta present in the saved weights, <saved - original, "
                "delta> / |delta|^2 (1: all of it; near 0: it rounded away in the weights' dtype; merge in "
                "float32 with `laten.merge.dtype: float32`). Overlap: the mean Jaccard index of the merge's target "
                "neurons with those each training step injected at (1: the same).", "",
                "| arm | budget | seeds | merged on | dtype | delta survival % (mean, lowest) | neuron overlap with training |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for m in results["merges"]:
            out.append(f"| {m['arm']} | {_budget_text(m['budget'])} | {m['seeds']} | {m['locate']} | {m['dtype']} | "
                       f"{_pct(m['delta_survival'])}, {_pct(m['delta_survival_min'])} | {m['training_overlap']:.2f} |")
    out += ["", "## Training", "", "![Training loss per arm and seed](training.png)", "",
            "## Settings", "", "```yaml", yaml.safe_dump({k: cfg[k] for k in ("task", "arms", "seeds", "budgets", "engine",
                                                                              "laten", "sft") if k in cfg},
                                                          sort_keys=False).rstrip(), "```", "", "## Models", ""]
    for role, m in results["models"].items():
        out.append(f"- {role}: `{m['spec']}` (config.json sha256 {m['config'][:16]}, weights "
                   f"{', '.join(f'{n} {s} bytes' for n, s in m['weights'])})")
    out += ["", "## Data", ""]
    for key, d in results["data"].items():
        out.append(f"- {key}: `{d['spec']}`, {d['records']} records, sha256 {d['sha256']}")
    out += ["", "## Time and hardware", "", "| unit | build s | of it training s | evaluations | evaluation s | host "
            "| CPU | CPUs | torch threads | GPUs |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, t in results["timing"].items():
        h = t["hardware"] or {}
        out.append("| " + " | ".join([label, _num(t["build_s"]), _num(t["train_s"]), str(t["evaluations"]),
                                      _num(t["eval_s"]), str(h.get("host", "")), str(h.get("cpu", "")),
                                      str(h.get("cpus", "")), str(h.get("torch_threads", "")),
                                      ", ".join(h.get("gpus") or []) or "-"]) + " |")
    out += ["", "Files: `results.json` (every number), `curves.png`, `scores.png`, `training.png`, `disagreements.md`; "
            "each arm's models, training run and per-item results are in `arms/`.", ""]
    return "\n".join(out)


def _num(x) -> str:
    return "" if x is None else f"{x:.1f}"


def disagreements(plan: dict, results: dict, limit: int = 100) -> str:
    """Items where the arms' verdicts differ (each arm's first seed at its largest budget),
    prompts and answers side by side."""
    units, seen = [], set()
    for u in plan["units"]:
        done = [k for k, run in u["runs"].items() if run is not None]
        if done and u["arm"] not in seen:
            seen.add(u["arm"])
            key = largest_budget(done)
            units.append((u["arm"] + ("" if key == "-" else f" @{key}"), u["runs"][key]["records"]))
    by_unit = [{r["id"]: r for r in records} for _, records in units]
    ids = [r["id"] for r in units[0][1]]
    differ = [i for i in ids if len({tuple(m[i]["correct"]) for m in by_unit}) > 1]
    out = [f"# Disagreements: {len(differ)} of {len(ids)} items", "",
           "Items on which the arms (each arm's first seed, at its largest budget) are not all right or all wrong"
           + (f"; the first {limit} are shown." if len(differ) > limit else "."), ""]
    for i in differ[:limit]:
        first = by_unit[0][i]
        out += [f"## `{i}`" + (f" (gold: {first['gold']})" if first.get("gold") else ""), "", "```",
                (first.get("input") or first.get("prompt") or "").rstrip(), "```", "",
                "| arm | verdict | answer | generation |", "| --- | --- | --- | --- |"]
        for (name, _), m in zip(units, by_unit):
            r = m[i]
            gen = (r["generations"][0] if r.get("generations") else "").strip().replace("\n", "⏎").replace("|", "\\|")
            ans = str(r["extracted"][0] if r.get("extracted") else "").replace("\n", "⏎").replace("|", "\\|")
            verdict = "right" if all(r["correct"]) else "wrong" if not any(r["correct"]) else \
                f"{sum(r['correct'])}/{len(r['correct'])}"
            out.append(f"| {name} | {verdict} | `{ans[:80]}` | {gen[:300]} |")
        out.append("")
    return "\n".join(out)


def write_report(study_dir: str | Path) -> dict:
    """Write every report file from the kept results; returns results.json's content and the table."""
    from .figures import plot_curves, plot_scores, plot_training
    study_dir = Path(study_dir)
    if not (study_dir / PLAN).is_file():
        raise FileNotFoundError(f"{study_dir}: no {PLAN} here; is it a study folder (made by `laten study`)?")
    plan = load(study_dir)
    results = compute(plan)
    ckpt.save_json(results, study_dir / "results.json")
    ckpt.save_text(markdown(results), study_dir / "report.md")
    ckpt.save_text(disagreements(plan, results), study_dir / "disagreements.md")
    plot_curves(results, study_dir / "curves.png")
    plot_scores(results, study_dir / "scores.png")
    plot_training(plan, study_dir, study_dir / "training.png")
    return {**results, "table": main_table(results)}
