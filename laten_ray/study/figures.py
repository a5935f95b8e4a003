"""The figures of a study's report (report.py): learning curves, scores at the largest budget, and
training losses. Arms whose results coincide must stay visible, so every arm has its own marker
and line style, and points at the same budget are spread sideways a little."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..records import read_records

MARKERS = "osD^vP*Xh<>"
STYLES = ("-", "--", "-.", ":")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _style(i: int) -> dict:
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)], "linestyle": STYLES[i % len(STYLES)]}


def plot_curves(results: dict, path: Path) -> None:
    """Score against training steps per trained arm, with 95% intervals (and seeds as dots); the
    target and the source as horizontal lines with their intervals as bands."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (role, color) in enumerate((("target", "0.35"), ("source", "#b8860b"))):
        row = next((a for a in results["arms"] if a["arm"] == role), None)
        if row:
            ax.axhline(100 * row["score"], color=color, lw=1.5, ls="-" if role == "target" else "--",
                       label=f"{role} {100 * row['score']:.1f}%")
            ax.axhspan(100 * row["ci95"][0], 100 * row["ci95"][1], color=color, alpha=0.12, lw=0)
    curves, order = results["curves"], list(results["config"]["arms"])
    n = max(len(curves), 1)
    for k, (arm, points) in enumerate(curves.items()):
        i = order.index(arm)  # the arm's style, the same in every figure
        spread = 1 + 0.05 * (k - (n - 1) / 2)  # a small sideways shift per arm (log axis): no point hides another
        x = np.array([p["budget"] for p in points], dtype=float) * spread
        y = np.array([100 * p["score"] for p in points])
        err = np.array([[100 * (p["score"] - p["ci95"][0]), 100 * (p["ci95"][1] - p["score"])] for p in points]).T
        ax.errorbar(x, y, yerr=err.clip(min=0), capsize=3, lw=1.6, ms=6, label=arm, **_style(i))
        for xb, p in zip(x, points):
            ax.plot([xb] * len(p["seed_scores"]), [100 * s for s in p["seed_scores"]], ".", color=f"C{i % 10}",
                    ms=3, alpha=0.6)
    budgets = sorted({p["budget"] for points in curves.values() for p in points})
    if budgets:
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
    else:
        ax.text(0.5, 0.5, "no learning curve: no trained arm, or one budget (set `budgets`)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("training budget (optimizer steps)")
    ax.set_ylabel(f"{results['metric']} (%)")
    ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))
    ax.set_title(f"{results['study']}: learning curves on {results['items']} items "
                 "(bars: 95% CI; dots: seeds)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    ckpt.save_png(fig, path, dpi=120)


def plot_scores(results: dict, path: Path) -> None:
    """Every arm at its largest budget (untrained arms as they are), mean over seeds with 95% CI."""
    plt = _pyplot()
    last = {}
    for a in results["arms"]:
        if a["arm"] not in last or (a["budget"] or 0) >= (last[a["arm"]]["budget"] or 0):
            last[a["arm"]] = a
    arms = list(last.values())
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 2, 4))
    x = np.arange(len(arms))
    means = [100 * a["score"] for a in arms]
    err = np.array([[100 * (a["score"] - a["ci95"][0]), 100 * (a["ci95"][1] - a["score"])] for a in arms]).T
    err = err.clip(min=0)  # an interval's end at 0 or 1 can sit a rounding error inside the mean
    ax.bar(x, means, yerr=err, capsize=4, color="#9ecae1", edgecolor="#3182bd")
    for i, a in enumerate(arms):
        ax.plot([i] * len(a["seed_scores"]), [100 * s for s in a["seed_scores"]], "k.", ms=6)
    labels = [a["arm"] + ("" if a["budget"] is None else f"\n@{a['budget']}") for a in arms]
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{results['metric']} (%)")
    ax.set_title(f"{results['study']}: {results['task']}, {results['items']} items, largest budget "
                 "(bars: mean over seeds, 95% CI; dots: seeds)", fontsize=9)
    fig.tight_layout()
    ckpt.save_png(fig, path, dpi=120)


def plot_training(plan: dict, study_dir: Path, path: Path) -> None:
    """The LM loss of every trained unit, step by step; each arm has its own line style and
    markers, so arms with the same curve (laten and its noise control early on) both show."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    arms: dict[str, int] = {}
    order = list(plan["config"]["arms"])
    for u in plan["units"]:
        metrics = (u["built"] or {}).get("metrics")
        if not metrics or not (study_dir / u["folder"] / metrics).is_file():
            continue
        rows = [r for _, r in read_records(str(study_dir / u["folder"] / metrics))]
        i = arms.setdefault(u["arm"], order.index(u["arm"]))  # the arm's style, as in curves.png
        steps = [m["step"] for m in rows]
        ax.plot(steps, [m["lm_loss"] for m in rows], alpha=0.75, lw=1.2, markevery=max(1, len(rows) // 8),
                ms=5, label=u["arm"] if u["seed"] == min(v["seed"] for v in plan["units"] if v["arm"] == u["arm"])
                else None, **_style(i))
    if not arms:
        ax.text(0.5, 0.5, "no trained arm in this study", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
        budgets = [b for b in plan.get("budgets", []) if b]
        for b in budgets[:-1]:
            ax.axvline(b, color="0.8", lw=0.8, zorder=0)
        if len(budgets) > 1 and budgets[-1] / budgets[0] > 20:  # 8 ... 512: the first budgets' steps stay readable
            ax.set_xscale("log")
    ax.set_xlabel("optimizer step (grey lines: the budgets evaluated)")
    ax.set_ylabel("LM loss on the step's answer tokens")
    ax.set_title("training: one line per arm and seed (each arm its own style)", fontsize=10)
    fig.tight_layout()
    ckpt.save_png(fig, path, dpi=120)
