"""The whole analysis of a pair (and of a study's arms), and its files: analysis.json (every
number), analysis.md (tables, the figures embedded), cka.png, parametric.png, neurons.png."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import checkpoint as ckpt
from ..arch import MODULES, Shape
from ..data import read_examples
from ..locate import align_layers, neuron_counts
from .cka import CKA, alignment_fit
from .neurons import KINDS, chance

KIND_OF = {"up": "ffn", "down": "ffn", "v": "attn", "o": "attn"}  # which layer score aligns a module (§2)
DEFAULT_RATE = 0.1


@dataclass
class Settings:
    max_length: int = 1024   # prompt + answer tokens per example, as data.max_length
    batch_size: int = 8      # examples per forward pass; their answer tokens are one minibatch
    gram_tokens: int = 256   # a minibatch is cut into pieces of at most this many tokens (Gram [b, b])
    chunk_mb: int = 256      # attribution's memory budget (docs/method.md §1)
    rate: float | None = None  # K of the neuron overlap; default a LaTen merge's rate, else 0.1


@dataclass
class Inputs:
    source: str
    target: str
    data: str
    limit: int | None = None
    extract: str = ""                 # the examples neurons are located on; default `data`
    extract_limit: int | None = None
    merged: list[dict] = field(default_factory=list)  # {"arm", "seed", "model": folder} to compare with the target
    study: str | None = None
    dtype: dict = field(default_factory=lambda: {"source": "float32", "target": "float32"})
    device: dict = field(default_factory=lambda: {"source": "auto", "target": "auto"})


def inputs_from_study(study_dir: str | Path, data: str | None = None, limit: int | None = None) -> tuple[Inputs, float]:
    """The pair, data and trained arms (at their largest budget) of a `laten study` folder, and LaTen's rate there. The CKA
    examples default to the study's align split, the neuron examples are its extract split."""
    import yaml

    from ..study.arms import largest_budget
    from ..study.config import study_from_dict
    study_dir = Path(study_dir)
    if not (study_dir / "plan.json").is_file():
        raise FileNotFoundError(f"{study_dir}: no plan.json here; is it a study folder (made by `laten study`)?")
    study = study_from_dict(yaml.safe_load((study_dir / "study.yaml").read_text()))
    merged = []
    for unit in json.loads((study_dir / "plan.json").read_text())["units"]:
        built = study_dir / unit["folder"] / "built.json"
        info = json.loads(built.read_text()) if built.is_file() else None
        if info and not info.get("as_is"):  # a trained arm: its model of the largest budget
            models = info.get("models") or {"-": info["model"]}  # "model": a study of before budgets
            merged.append({"arm": unit["arm"], "seed": unit["seed"],
                           "model": str(study_dir / unit["folder"] / models[largest_budget(models)])})
    rate = (study.laten.get("transfer") or {}).get("rate", DEFAULT_RATE)
    inputs = Inputs(study.source.model, study.target.model, data or study.task.align, limit, study.task.extract, None,
                    merged, str(study_dir), {"source": study.source.dtype, "target": study.target.dtype},
                    {"source": study.source.device, "target": study.target.device})
    return inputs, rate


def widths(shape: Shape) -> dict[str, int]:
    """Output width of each analysed module."""
    return {"up": shape.ffn, "down": shape.hidden, "v": shape.kv_width, "o": shape.hidden}


def memory(t: Shape, s: Shape, tokens: int, largest_piece: int) -> dict:
    """Bytes of each way to get the CKA (cka.py says why the minibatch one is used)."""
    wt, ws = widths(t), widths(s)
    return {"grams_per_model_batch": max(t.n_layers, s.n_layers) * len(MODULES) * largest_piece ** 2 * 8,
            "feature_space_exact": sum(8 * (t.n_layers * s.n_layers * wt[m] * ws[m] + t.n_layers * wt[m] ** 2
                                            + s.n_layers * ws[m] ** 2) for m in MODULES),
            "full_grams_exact": (t.n_layers + s.n_layers) * len(MODULES) * tokens ** 2 * 8,
            "all_activations": tokens * sum(4 * (t.n_layers * wt[m] + s.n_layers * ws[m]) for m in MODULES)}


def _num(x):
    """A float for JSON: None for NaN (a layer whose outputs are constant on these tokens)."""
    x = float(x)
    return None if math.isnan(x) else x


def in_turn(sides: dict) -> Callable:
    """call([(role, method, args), ...]) -> their results in order, one after the other in this
    process; `sides` = {"target": Side, "source": Side}."""
    return lambda calls: [getattr(sides[role], method)(*args) for role, method, args in calls]


def analyze(inputs: Inputs, settings: Settings, shapes: tuple[Shape, Shape], call: Callable,
            log: Callable[[str], None] = print) -> dict:
    """Every number of analysis.json. `shapes` = (target's, source's); `call(calls)` runs
    methods of side.Side on the target or source, [(role, method, args), ...] -> results
    (`in_turn`, or on two Ray actors at once)."""
    st, ss = shapes
    if ss.n_layers < st.n_layers:
        raise ValueError(f"the source has {ss.n_layers} layers, fewer than the target's {st.n_layers}")
    examples = read_examples(inputs.data, inputs.limit)
    extract = read_examples(inputs.extract or inputs.data, inputs.extract_limit if inputs.extract else inputs.limit)
    s = settings
    seconds = {}
    t0 = time.perf_counter()
    acc, largest = CKA(st.n_layers, ss.n_layers), 0
    for b0 in range(0, len(examples), s.batch_size):
        args = (examples[b0:b0 + s.batch_size], s.max_length, s.gram_tokens)
        gt, gs = call([("target", "grams", args), ("source", "grams", args)])
        if gt["tokens"] != gs["tokens"]:
            raise ValueError("the source and the target tokenize the answers differently; CKA needs the same tokens")
        acc.add(gt["grams"], gs["grams"])
        largest = max([largest] + [g.shape[-1] for g in gt["grams"][MODULES[0]]])
        log(f"representations: {min(b0 + s.batch_size, len(examples))}/{len(examples)} examples, "
            f"{acc.tokens} answer tokens")
    cka = acc.values()
    seconds["representation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"parametric: {len(inputs.merged)} merged model(s) against the target")
    found = call([("target", "deltas", (m["model"],)) for m in inputs.merged])
    parametric = [{**m, **f} for m, f in zip(inputs.merged, found)]
    seconds["parametric"] = time.perf_counter() - t0

    rate = s.rate or next((p["rate"] for p in parametric if p.get("rate")), DEFAULT_RATE)
    counts = neuron_counts(st, rate, MODULES)
    t0 = time.perf_counter()
    log(f"neurons: attributing {len(extract)} examples on both models")
    args = (extract, counts, s.batch_size, s.chunk_mb)
    nt, ns = call([("target", "neurons", args), ("source", "neurons", args)])
    seconds["neurons"] = time.perf_counter() - t0

    rep = {}
    rows = torch.arange(st.n_layers)
    for m in MODULES:
        per_example = ns[f"layer_{KIND_OF[m]}"]                                 # [N, L_s]
        chosen = align_layers(per_example.sum(0), st.n_layers)                  # [L_t]
        freq = torch.zeros(st.n_layers, ss.n_layers, dtype=torch.float64)
        for row in per_example:
            freq[rows, align_layers(row, st.n_layers)] += 1 / len(per_example)
        c = cka[m]
        rep[m] = {"cka": [[_num(v) for v in r] for r in c.tolist()], "mean": _num(c.nanmean()),
                  "std": _num(c[~c.isnan()].std()) if c.numel() > 1 else 0.0,
                  "aligned_layers": chosen.tolist(), "alignment_frequency": freq.tolist(),
                  "fit": alignment_fit(c, chosen)}
    return {
        "source": inputs.source, "target": inputs.target, "study": inputs.study,
        "shapes": {"source": asdict(ss), "target": asdict(st)},
        "data": {"spec": inputs.data, "examples": len(examples), "answer_tokens": acc.tokens, "pieces": acc.pieces},
        "extract": {"spec": inputs.extract or inputs.data, "examples": len(extract)},
        "settings": asdict(s), "rate": rate, "neurons_per_layer": counts,
        "representation": {"estimator": "unbiased minibatch linear CKA (U-centred Grams, pieces of at most "
                                         f"{s.gram_tokens} answer tokens)", "modules": rep,
                           "memory_bytes": memory(st, ss, acc.tokens, largest)},
        "parametric": parametric,
        "neurons": {"jaccard": {"target": nt["jaccard"], "source": ns["jaccard"]},
                    "chance": {k: {"target": chance(counts[m], st.neurons(m)), "source": chance(counts[m], ss.neurons(m))}
                               for k, m in KINDS.items()},
                    "delta_share": [{"arm": p["arm"], "seed": p.get("seed"), "shares": p["delta_share"]}
                                    for p in parametric if "delta_share" in p]},
        "seconds": seconds,
    }


# --- figures ------------------------------------------------------------------------------------

DPI = 110


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _integer_ticks(ax, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def cka_figure(results: dict):
    """One heatmap per module (target layers down, source layers across), the aligned source
    layer of each target layer marked."""
    plt = _plt()
    rep = results["representation"]["modules"]
    fig, axes = plt.subplots(1, len(rep), figsize=(4.2 * len(rep), 3.8), squeeze=False)
    for ax, (m, r) in zip(axes[0], rep.items()):
        c = torch.tensor([[float("nan") if v is None else v for v in row] for row in r["cka"]])
        im = ax.imshow(c.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.scatter(r["aligned_layers"], range(len(r["aligned_layers"])), marker="s", s=60, facecolors="none",
                   edgecolors="red", linewidths=1.5, label="aligned source layer")
        ax.set_title(f"{m}_proj output: mean {r['mean']:.2f}, std {r['std']:.2f}")
        ax.set_xlabel("source layer")
        ax.set_ylabel("target layer")
        _integer_ticks(ax, y=True)
        fig.colorbar(im, ax=ax, fraction=0.046)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(0, -0.15), fontsize=8, frameon=False)
    fig.suptitle(f"linear CKA, {results['data']['answer_tokens']} answer tokens of {results['data']['examples']} examples")
    fig.tight_layout()
    return fig


def _arm_means(parametric: list[dict], key: str) -> dict[str, dict[str, list]]:
    """{arm: {module: per-layer mean over seeds of `key`}}."""
    out: dict = {}
    for p in parametric:
        for m, rows in p["modules"].items():
            out.setdefault(p["arm"], {}).setdefault(m, []).append([r[key] for r in rows])
    return {a: {m: [_mean(col) for col in zip(*runs)] for m, runs in mods.items()} for a, mods in out.items()}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def parametric_figure(results: dict):
    """Two heatmaps: cos(delta, target weight) and cos(delta, merged weight), one row per arm and
    module (mean over seeds), one column per target layer; grey where that matrix is unchanged."""
    import numpy as np
    plt = _plt()
    order = ("up", "down", "v", "o", "q", "k", "gate")
    panels = [("cos_target", "cos(delta, target weight)"), ("cos_merged", "cos(delta, merged weight)")]
    means = {key: _arm_means(results["parametric"], key) for key, _ in panels}
    rows = [(arm, m) for arm, mods in means["cos_target"].items() for m in order if m in mods]
    layers = max(len(means["cos_target"][a][m]) for a, m in rows)

    def grid(key):
        vals = [means[key][a][m] + [None] * (layers - len(means[key][a][m])) for a, m in rows]
        return np.array([[np.nan if v is None else v for v in r] for r in vals], dtype=float)
    grids = [grid(key) for key, _ in panels]
    # one colour scale centred on 0 (white: orthogonal), as wide as the largest |cos| of both panels
    lim = float(np.nanmax(np.abs(np.concatenate(grids)), initial=0.0)) or 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")
    width = min(max(3.0, 0.55 * layers + 0.8), 9.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * width + 3.2, 0.32 * len(rows) + 2.0), sharey=True,
                             layout="constrained")
    for ax, g, (_, title) in zip(axes, grids, panels):
        im = ax.imshow(g, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        if layers <= 16:  # the values themselves, while the cells are wide enough to hold them
            for (i, j), v in np.ndenumerate(g):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}".replace("-0.00", "0.00"), ha="center", va="center", fontsize=7,
                            color="white" if abs(v) > 0.6 * lim else "black")
        for i in range(1, len(rows)):  # a line between arms
            if rows[i][0] != rows[i - 1][0]:
                ax.axhline(i - 0.5, color="black", lw=1)
        ax.set_title(title)
        ax.set_xlabel("target layer")
        ax.set_xticks(range(0, layers, max(1, layers // 8)))  # whole layers only, at most about 8 labels
    axes[0].set_yticks(range(len(rows)), [f"{a}: {m}_proj" for a, m in rows])
    fig.colorbar(im, ax=axes, shrink=0.9, label="cosine (0: orthogonal)")
    fig.suptitle("cosine of the injected delta with the weight, per arm and module (mean over seeds; "
                 "grey: matrix unchanged)")
    return fig


def neurons_figure(results: dict):
    """Jaccard stability of the top-K neurons per layer (source, target; chance dashed), and the
    share of the delta norm per target layer of each LaTen merge (mean over seeds). The legends
    sit outside the panels, off the data."""
    from matplotlib.lines import Line2D
    plt = _plt()
    n = results["neurons"]
    shares: dict = {}
    for d in n["delta_share"]:
        for m, v in d["shares"].items():
            shares.setdefault(d["arm"], {}).setdefault(m, []).append(v)
    labels = [f"{arm}: {m}_proj" for arm, mods in shares.items() for m in mods]
    extra = 0.8 + 0.065 * max(map(len, labels)) if labels else 0.0  # room for the legend right of the last panel
    fig, axes = plt.subplots(1, len(KINDS) + 1, figsize=(3.6 * (len(KINDS) + 1) + extra, 4.0), squeeze=False,
                             layout="constrained")
    for ax, kind in zip(axes[0], KINDS):
        for role, color in (("source", "C1"), ("target", "C0")):
            vals = [float("nan") if v is None else v for v in n["jaccard"][role].get(kind, [])]
            ax.plot(vals, color=color, marker=".")
            ax.axhline(n["chance"][kind][role], color=color, ls="--", lw=0.8)
        ax.set_title(f"{kind}: top-K Jaccard across examples")
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        _integer_ticks(ax)
    axes[0][0].set_ylabel("mean pairwise Jaccard")
    # one legend for the three Jaccard panels, below the middle one
    handles = [Line2D([], [], color="C0", marker=".", label="target"),
               Line2D([], [], color="C1", marker=".", label="source"),
               Line2D([], [], color="gray", ls="--", lw=0.8, label="chance level")]
    axes[0][len(KINDS) // 2].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
                                    fontsize=8, frameon=False)
    ax = axes[0][-1]
    # modules in colours C2.. so that none repeats the Jaccard panels' target (C0) or source (C1)
    for i, (arm, mods) in enumerate(shares.items()):
        for m, runs in mods.items():
            ax.plot([sum(c) / len(c) for c in zip(*runs)], color=f"C{MODULES.index(m) + 2}",
                    ls=["-", "--", ":", "-."][i % 4], marker=".", label=f"{arm}: {m}_proj")
    ax.set_title("share of ||delta||^2 per target layer")
    ax.set_xlabel("target layer")
    _integer_ticks(ax)
    if not shares:  # an empty panel with a note, no meaningless ticks
        ax.text(0.5, 0.5, "no LaTen merge given", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    return fig


# --- markdown -----------------------------------------------------------------------------------

def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    r, d = results["representation"], results["data"]
    out = [f"# Analysis: {results['source']} -> {results['target']}", ""]
    if results["study"]:
        out += [f"Study: `{results['study']}`.", ""]
    out += ["## 1. Representation similarity (linear CKA)", "",
            f"{d['examples']} examples of `{d['spec']}`, {d['answer_tokens']} answer tokens in {d['pieces']} pieces; "
            f"{r['estimator']}. Red squares: the source layer LaTen's alignment (docs/method.md §2) picks for each "
            f"target layer from the summed scores of the {results['extract']['examples']} extract examples.", "",
            "![CKA](cka.png)", "",
            "| module | mean CKA | std | CKA at aligned layer | best CKA in row | aligned is best | aligned rank |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, v in r["modules"].items():
        f = v["fit"]
        out.append(f"| {m} | {_f(v['mean'])} | {_f(v['std'])} | {_f(f['aligned_mean'])} | {_f(f['best_mean'])} | "
                   f"{f['aligned_is_best']:.0%} | {f['aligned_rank_mean']:.1f} |")
    mem = r["memory_bytes"]
    out += ["", f"Memory: {mem['grams_per_model_batch'] / 2**20:.1f} MiB of Grams per model and batch; the exact "
            f"feature-space statistics would take {mem['feature_space_exact'] / 2**20:.1f} MiB, all-token Grams "
            f"{mem['full_grams_exact'] / 2**20:.1f} MiB, the activations themselves {mem['all_activations'] / 2**20:.1f} MiB.", ""]
    out += ["## 2. Parametric similarity of the injected deltas", ""]
    if results["parametric"]:
        out += ["The figure: cos(delta, target weight) and cos(delta, merged weight) per target layer, one row per "
                "arm and module (mean over seeds); the table: their means over target layers (and seeds) and "
                "||delta|| / ||W||. A LaTen merge is compared on the rows or columns it touched, any other arm on "
                "every linear matrix.", "", "![parametric](parametric.png)", "",
                "| arm | seed | module | cos(delta, W_target) | cos(delta, W_merged) | relative norm |",
                "| --- | --- | --- | --- | --- | --- |"]
        for p in results["parametric"]:
            for m, rows in p["modules"].items():
                out.append(f"| {p['arm']} | {'-' if p.get('seed') is None else p['seed']} | {m} | "
                           f"{_f(_mean(x['cos_target'] for x in rows), 4)} | {_f(_mean(x['cos_merged'] for x in rows), 4)} | "
                           f"{_f(_mean(x['relative_norm'] for x in rows), 6)} |")
    else:
        out += ["No merged model given (`--merged DIR`, or `--study`)."]
    n = results["neurons"]
    out += ["", "## 3. Neuron overlap", "",
            f"Top-K neurons (K = {results['neurons_per_layer']} at rate {results['rate']}) of each of the "
            f"{results['extract']['examples']} examples of `{results['extract']['spec']}`; mean pairwise Jaccard index "
            "over examples, averaged over layers (chance: two random K-sets).", "", "![neurons](neurons.png)", "",
            "| neurons | source | source chance | target | target chance |", "| --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        out.append(f"| {kind} | {_f(_mean(n['jaccard']['source'].get(kind, [])))} | {_f(n['chance'][kind]['source'])} | "
                   f"{_f(_mean(n['jaccard']['target'].get(kind, [])))} | {_f(n['chance'][kind]['target'])} |")
    out += ["", "(`ffn` is up_proj rows and down_proj columns, which share a selection; `v` and `o` coincide in a "
            "model with as many key/value heads as query heads, where a v_proj row scores as its o_proj column.)"]
    if n["delta_share"]:
        layers = len(next(iter(n["delta_share"][0]["shares"].values())))
        out += ["", "Share of the squared delta norm per target layer:", "",
                "| arm | seed | module | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
                "| --- " * (3 + layers) + "|"]
        for dsh in n["delta_share"]:
            for m, v in dsh["shares"].items():
                out.append(f"| {dsh['arm']} | {'-' if dsh['seed'] is None else dsh['seed']} | {m} | "
                           + " | ".join(f"{x:.2f}" for x in v) + " |")
    out += ["", "Every number: `analysis.json`.", ""]
    return "\n".join(out)


def write(results: dict, out: str | Path) -> Path:
    """analysis.json, analysis.md and the figures in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_json(results, out / "analysis.json")
    ckpt.save_png(cka_figure(results), out / "cka.png", DPI)
    if results["parametric"]:
        ckpt.save_png(parametric_figure(results), out / "parametric.png", DPI)
    ckpt.save_png(neurons_figure(results), out / "neurons.png", DPI)
    ckpt.save_text(markdown(results), out / "analysis.md")
    return out


def run_extract(merged: list[dict]) -> str | None:
    """The extract data of the run behind the first LaTen merge given (its laten_merge.json
    names the run folder, whose config.yaml is the resolved config), if that run is here."""
    import yaml
    for m in merged:
        report = Path(m["model"]) / "laten_merge.json"
        run = json.loads(report.read_text()).get("run") if report.is_file() else None
        if run and (Path(run) / "config.yaml").is_file():
            return yaml.safe_load((Path(run) / "config.yaml").read_text())["data"]["extract"]
    return None


def merged_inputs(folders: list[str]) -> list[dict]:
    """`--merged DIR ...`: each folder an arm named by the folder."""
    out = []
    for folder in folders:
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"--merged {folder}: no config.json there (an HF model folder)")
        path = Path(folder)
        name = path.parent.name if path.name == "model" else path.name  # a study unit's model/: its unit
        out.append({"arm": name, "seed": None, "model": str(folder)})
    return out
