"""A study's report, computed from the kept per-item results alone (docs/method.md §10), so
`laten report STUDY_DIR` rebuilds it exactly: report.md, results.json, scores.png, training.png
and disagreements.md in the study folder.

Statistics: every arm is compared with `target` on the same items. A run (arm, seed) scores
each item 0/1 (or its fraction of passing samples); its interval is Wilson's (normal for
fractions). An arm's row averages its seeds per item: mean and std over seeds, the interval of
the per-item means, the paired difference from the target with a paired-bootstrap interval
(10,000 resamples over items, seed 0), and a p-value (exact McNemar for one seed's 0/1 scores,
else a paired sign-flip permutation test), Holm-adjusted across the arms compared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from .. import checkpoint as ckpt
from ..eval.stats import compare, holm
from ..eval.tasks import interval95
from ..records import read_records
from .units import BUILT, PLAN

ALPHA = 0.05


def _read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in read_records(str(path))]  # a bad line is an error naming it


def load(study_dir: Path) -> dict:
    """The plan and, per unit, its build record, evaluation summary and per-item records."""
    plan = json.loads((study_dir / PLAN).read_text(encoding="utf-8"))
    for u in plan["units"]:
        u["label"] = u["arm"] if u["seed"] is None else f"{u['arm']} seed {u['seed']}"
        built, ev = study_dir / u["folder"] / BUILT, study_dir / u["eval"]
        u["built"] = json.loads(built.read_text(encoding="utf-8")) if built.is_file() else None
        if u["built"] and u["built"].get("hash") != u["hash"]:
            u["built"] = None
        done = (ev / "summary.json").is_file() and (ev / "examples.jsonl").is_file()
        u["summary"] = json.loads((ev / "summary.json").read_text(encoding="utf-8")) if done else None
        u["records"] = _read_jsonl(ev / "examples.jsonl") if done else None
    return plan


def _scores(records: list[dict], ids: list[str]) -> np.ndarray:
    """Per item (in `ids` order): the fraction of its samples judged correct. [N]"""
    by_id = {r["id"]: r for r in records}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"evaluations cover different items (missing {missing[:3]}...)")
    return np.array([sum(by_id[i]["correct"]) / len(by_id[i]["correct"]) for i in ids])


def _paired(base: np.ndarray, other: np.ndarray) -> dict:
    p = compare(base, other)
    return {"difference": p.difference, "ci95": list(p.ci95), "base_only": p.only_a, "arm_only": p.only_b,
            "p": p.p, "test": "exact McNemar" if p.p_mcnemar is not None else "paired permutation"}


def _holm_into(rows: list[dict], key: str) -> None:
    found = [r[key] for r in rows if r.get(key)]
    for r, adjusted in zip(found, holm([c["p"] for c in found])):
        r["p_holm"] = adjusted
        r["verdict"] = ("no detectable difference" if adjusted >= ALPHA else
                        "higher" if r["difference"] > 0 else "lower")


def compute(plan: dict) -> dict:
    """results.json's content: everything but times is a function of the per-item results."""
    units = [u for u in plan["units"] if u["records"] is not None]
    target = next((u for u in units if u["arm"] == "target"), None)
    if target is None:
        raise ValueError("the target arm has no results yet; nothing can be compared")
    ids = [r["id"] for r in target["records"]]
    base = _scores(target["records"], ids)
    arms_order = list(dict.fromkeys(u["arm"] for u in plan["units"]))
    arms, runs = [], []
    per_arm_scores: dict[str, np.ndarray] = {}
    for arm in arms_order:
        mine = [u for u in units if u["arm"] == arm]
        if not mine:
            continue
        arm_runs = []
        for u in mine:
            s = _scores(u["records"], ids)
            lo, hi = interval95(s.tolist())
            run = {"arm": arm, "seed": u["seed"], "score": float(s.mean()), "ci95": [lo, hi], "hash": u["hash"],
                   "folder": u["folder"], "vs_target": None if arm == "target" else _paired(base, s)}
            arm_runs.append(run)
            runs.append(run)
        per_item = np.mean([_scores(u["records"], ids) for u in mine], axis=0)  # [N] seed mean per item
        per_arm_scores[arm] = per_item
        seed_scores = [r["score"] for r in arm_runs]
        lo, hi = interval95(per_item.tolist())
        arms.append({"arm": arm, "seeds": [u["seed"] for u in mine], "score": float(per_item.mean()),
                     "std": float(np.std(seed_scores, ddof=1)) if len(seed_scores) > 1 else 0.0,
                     "ci95": [lo, hi], "seed_scores": seed_scores,
                     "vs_target": None if arm == "target" else _paired(base, per_item)})
    _holm_into(arms, "vs_target")
    _holm_into(runs, "vs_target")
    if "laten" in per_arm_scores:  # the controls and baselines against LaTen itself
        for a in arms:
            if a["arm"] not in ("target", "source", "laten"):
                a["vs_laten"] = _paired(per_arm_scores["laten"], per_arm_scores[a["arm"]])
        _holm_into(arms, "vs_laten")
    s = target["summary"]
    missing = [u["label"] for u in plan["units"] if u["records"] is None]
    timing = {u["label"]: {"build_s": (u["built"] or {}).get("build_s"), "eval_s": (u["summary"] or {}).get("seconds"),
                           "hardware": (u["built"] or {}).get("hardware")} for u in plan["units"]}
    return {"study": plan["study"], "task": s["task"], "eval": plan["data"]["eval"], "items": len(ids),
            "metric": s["metric"], "protocol": s.get("protocol"), "sampling": s.get("sampling"),
            "engine": s.get("engine"), "arms": arms, "runs": runs, "missing": missing,
            "models": plan["models"], "data": plan["data"], "config": plan["config"], "timing": timing}


# --- files -----------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"{_pct(ci[0])} to {_pct(ci[1])}"


def _diff(c: dict | None) -> list[str]:
    if not c:
        return ["", "", "", ""]
    return [f"{100 * c['difference']:+.1f}", _ci(c["ci95"]), f"{c['p_holm']:.3g}", c["verdict"]]


def main_table(results: dict) -> str:
    lines = ["| arm | seeds | score % (mean ± std) | 95% CI | vs target (points) | paired 95% CI | p (Holm) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for a in results["arms"]:
        seeds = "-" if a["seeds"] == [None] else ",".join(str(s) for s in a["seeds"])
        spread = f" ± {_pct(a['std'])}" if len(a["seeds"]) > 1 else ""
        lines.append("| " + " | ".join([a["arm"], seeds, _pct(a["score"]) + spread, _ci(a["ci95"]),
                                        *_diff(a["vs_target"])]) + " |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    cfg, sampling, protocol = results["config"], results["sampling"] or {}, results["protocol"] or {}
    out = [f"# Study `{results['study']}`: did the transfer work?", "",
           f"Task **{results['task']}** on `{results['eval']['spec']}` ({results['items']} items, the same for every "
           f"arm), metric {results['metric']}; protocol: chat format {protocol.get('format')}, {protocol.get('shots', 0)} "
           f"shot(s), {protocol.get('mode')}; sampling: temperature {sampling.get('temperature')}, max_tokens "
           f"{sampling.get('max_tokens')}, n {sampling.get('n')}; engine {results['engine']}.", "",
           main_table(results), "",
           "Score: the arm's mean per-item score in percent, averaged over its seeds (± their std). 95% CI: "
           "Wilson's interval for one seed's 0/1 scores, else the normal interval of the per-item seed means. "
           "vs target: the paired difference in points on the same items; its interval is a paired bootstrap "
           "over items (10,000 resamples). p: exact McNemar for one seed's 0/1 scores, otherwise a paired "
           "sign-flip permutation test, Holm-adjusted across the arms compared with the target; the verdict "
           f"calls a difference only where the adjusted p < {ALPHA}.", ""]
    if results["missing"]:
        out += [f"**Missing** (not finished or failed, left out of every number): {', '.join(results['missing'])}.", ""]
    out += ["## Per seed", "", "| arm | seed | score % | 95% CI | vs target (points) | paired 95% CI | "
            "items only target / only arm right | test | p | p (Holm) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["runs"]:
        c = r["vs_target"]
        tail = ["", "", "", "", "", ""] if not c else [
            f"{100 * c['difference']:+.1f}", _ci(c["ci95"]), f"{c['base_only']} / {c['arm_only']}", c["test"],
            f"{c['p']:.3g}", f"{c['p_holm']:.3g}"]
        out.append("| " + " | ".join([r["arm"], "-" if r["seed"] is None else str(r["seed"]), _pct(r["score"]),
                                      _ci(r["ci95"]), *tail]) + " |")
    against = [a for a in results["arms"] if a.get("vs_laten")]
    if against:
        out += ["", "## Against LaTen", "",
                "If `laten-noise-source` or `laten-random-neurons` scores like `laten`, what LaTen gained did not "
                "come from the source's knowledge or from the located neurons; `sft-lora` is what the same "
                "examples give without a source.", "",
                "| arm | vs laten (points) | paired 95% CI | p (Holm) | verdict |", "| --- | --- | --- | --- | --- |"]
        for a in against:
            out.append("| " + " | ".join([a["arm"], *_diff(a["vs_laten"])]) + " |")
    out += ["", "## Settings", "", "```yaml", yaml.safe_dump({k: cfg[k] for k in ("task", "arms", "seeds", "engine",
                                                                                   "laten", "sft")}, sort_keys=False).rstrip(),
            "```", "", "## Models", ""]
    for role, m in results["models"].items():
        out.append(f"- {role}: `{m['spec']}` (config.json sha256 {m['config'][:16]}, weights "
                   f"{', '.join(f'{n} {s} bytes' for n, s in m['weights'])})")
    out += ["", "## Data", ""]
    for key, d in results["data"].items():
        out.append(f"- {key}: `{d['spec']}`, {d['records']} records, sha256 {d['sha256']}")
    out += ["", "## Time and hardware", "", "| unit | build s | evaluation s | host | CPU | CPUs | torch threads | GPUs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, t in results["timing"].items():
        h = t["hardware"] or {}
        out.append("| " + " | ".join([label, _num(t["build_s"]), _num(t["eval_s"]), str(h.get("host", "")),
                                      str(h.get("cpu", "")), str(h.get("cpus", "")), str(h.get("torch_threads", "")),
                                      ", ".join(h.get("gpus") or []) or "-"]) + " |")
    out += ["", "Files: `results.json` (every number), `scores.png`, `training.png`, `disagreements.md`; each arm's "
            "model, training run and per-item results are in `arms/`.", ""]
    return "\n".join(out)


def _num(x) -> str:
    return "" if x is None else f"{x:.1f}"


def disagreements(plan: dict, results: dict, limit: int = 100) -> str:
    """Items where the arms' verdicts differ (each arm's first seed), prompts and answers side by side."""
    units, seen = [], set()
    for u in plan["units"]:
        if u["records"] is not None and u["arm"] not in seen:
            seen.add(u["arm"])
            units.append(u)
    by_unit = [{r["id"]: r for r in u["records"]} for u in units]
    ids = [r["id"] for r in units[0]["records"]]
    differ = [i for i in ids if len({tuple(m[i]["correct"]) for m in by_unit}) > 1]
    out = [f"# Disagreements: {len(differ)} of {len(ids)} items", "",
           "Items on which the arms (each arm's first seed) are not all right or all wrong"
           + (f"; the first {limit} are shown." if len(differ) > limit else "."), ""]
    for i in differ[:limit]:
        first = by_unit[0][i]
        out += [f"## `{i}`" + (f" (gold: {first['gold']})" if first.get("gold") else ""), "", "```",
                (first.get("input") or first.get("prompt") or "").rstrip(), "```", "",
                "| arm | verdict | answer | generation |", "| --- | --- | --- | --- |"]
        for u, m in zip(units, by_unit):
            r = m[i]
            gen = (r["generations"][0] if r.get("generations") else "").strip().replace("\n", "⏎").replace("|", "\\|")
            ans = str(r["extracted"][0] if r.get("extracted") else "").replace("\n", "⏎").replace("|", "\\|")
            verdict = "right" if all(r["correct"]) else "wrong" if not any(r["correct"]) else \
                f"{sum(r['correct'])}/{len(r['correct'])}"
            out.append(f"| {u['arm']} | {verdict} | `{ans[:80]}` | {gen[:300]} |")
        out.append("")
    return "\n".join(out)


def plot_scores(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = results["arms"]
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 2, 4))
    x = np.arange(len(arms))
    means = [100 * a["score"] for a in arms]
    err = np.array([[100 * (a["score"] - a["ci95"][0]), 100 * (a["ci95"][1] - a["score"])] for a in arms]).T
    err = err.clip(min=0)  # an interval's end at 0 or 1 can sit a rounding error inside the mean
    ax.bar(x, means, yerr=err, capsize=4, color="#9ecae1", edgecolor="#3182bd", label="mean over seeds, 95% CI")
    for i, a in enumerate(arms):
        ax.plot([i] * len(a["seed_scores"]), [100 * s for s in a["seed_scores"]], "k.", ms=6)
    ax.set_xticks(x, [a["arm"] for a in arms], rotation=20, ha="right")
    ax.set_ylabel(f"{results['metric']} (%)")
    ax.set_title(f"{results['study']}: {results['task']}, {results['items']} items (dots: seeds)")
    fig.tight_layout()
    ckpt.save_png(fig, path, dpi=120)


def plot_training(plan: dict, study_dir: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {}
    for u in plan["units"]:
        metrics = (u["built"] or {}).get("metrics")
        if not metrics or not (study_dir / u["folder"] / metrics).is_file():
            continue
        rows = _read_jsonl(study_dir / u["folder"] / metrics)
        color = colors.setdefault(u["arm"], f"C{len(colors)}")
        ax.plot([m["step"] for m in rows], [m["lm_loss"] for m in rows], color=color, alpha=0.8,
                label=u["arm"] if u["arm"] not in ax.get_legend_handles_labels()[1] else None)
    if not colors:
        ax.text(0.5, 0.5, "no trained arm in this study", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("LM loss on the step's answer tokens")
    ax.set_title("training: one line per arm and seed")
    fig.tight_layout()
    ckpt.save_png(fig, path, dpi=120)


def write_report(study_dir: str | Path) -> dict:
    """Write every report file from the kept results; returns results.json's content and the table."""
    study_dir = Path(study_dir)
    if not (study_dir / PLAN).is_file():
        raise FileNotFoundError(f"{study_dir}: no {PLAN} here; is it a study folder (made by `laten study`)?")
    plan = load(study_dir)
    results = compute(plan)
    ckpt.save_json(results, study_dir / "results.json")
    ckpt.save_text(markdown(results), study_dir / "report.md")
    ckpt.save_text(disagreements(plan, results), study_dir / "disagreements.md")
    plot_scores(results, study_dir / "scores.png")
    plot_training(plan, study_dir, study_dir / "training.png")
    return {**results, "table": main_table(results)}
