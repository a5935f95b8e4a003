"""Merge (docs/method.md §7): translate slices with a trained hypernetwork and add them into the
target's weights for real, writing an ordinary HF model folder. Needs the run's checkpoint and
the seed example only: no training data, no optimizer."""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .checks import check_inputs
from .config import Config, validate
from .data import read_examples
from .hints import MERGE_REPORT
from .hypernet import HyperNet
from .inject import merge_into
from .locate import Located, Source, Target
from .train import make_hypernet

REPORT = MERGE_REPORT  # hints.py names it too, where importing this module (torch) would be too much


def seed_example(cfg: Config):
    spec = cfg.merge.seed_data or cfg.data.extract
    examples = read_examples(spec, limit=cfg.merge.seed_example + 1)
    if cfg.merge.seed_example >= len(examples):
        raise ValueError(f"merge.seed_example: {cfg.merge.seed_example} is past the end of {spec} "
                         f"({len(examples)} examples)")
    return examples[cfg.merge.seed_example]


def merge_examples(cfg: Config) -> list:
    """What the merge locates on (merge.locate): the seed example, or the whole extract set."""
    return read_examples(cfg.data.extract) if cfg.merge.locate == "extract-sum" else [seed_example(cfg)]


def plan_edit(source: Source, target: Target, hypernet: HyperNet, examples: list, source_edit=None,
              target_edit=None):
    """Locate on `examples` on both sides (their summed scores; K from `target.counts`) and
    translate the source's slices: (source selection, target selection, deltas {module: [L_t, K, d_t]})."""
    (located_source,) = source.locate(examples, target.arch.shape, target.counts, summed=True)
    (located_target,) = target.locate(examples, summed=True)
    if source_edit:
        located_source = source_edit(located_source)
    if target_edit:
        located_target = target_edit(located_target)
    with torch.no_grad():
        deltas = hypernet(located_source.slices)
    return located_source, located_target, deltas


def training_overlap(cfg: Config, target: Target, merge_index: dict[str, torch.Tensor], steps: int) -> dict:
    """How far the merge's target neurons are those training injected at: per module and layer,
    the Jaccard index of the merge's K neurons with each training step's (its extract example's
    selection at transfer.rate), averaged over the `steps` steps trained. Attributes the extract
    examples training used on the target (cache hits in a study)."""
    extract = read_examples(cfg.data.extract)
    used = Counter(s % len(extract) for s in range(steps))  # extract index -> steps it served
    trained = Target(cfg, cfg.transfer.rate, model=target.model, tokenizer=target.tokenizer)
    trained.cache = target.cache  # the same weights: one hash
    selections = dict(zip(sorted(used), trained.locate([extract[i] for i in sorted(used)])))
    out = {}
    for module, index in merge_index.items():  # [L_t, K]
        per_layer = []
        for layer in range(index.shape[0]):
            ours = set(index[layer].tolist())
            total = sum(n * _jaccard(ours, set(selections[i].index[module][layer].tolist())) for i, n in used.items())
            per_layer.append(total / steps)
        out[module] = {"mean": sum(per_layer) / len(per_layer), "per_layer": per_layer}
    return out


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def load_hypernet(cfg: Config, state: dict, d_source: int, target: Target) -> HyperNet:
    hypernet = make_hypernet(cfg, d_source, target.arch.shape.hidden).to(target.model.device)
    hypernet.load_state_dict(state["hypernet"])
    return hypernet


def merge(cfg: Config, step: int | None, rate: float | None, out: str | Path,
          overwrite: bool = False, source_edit: Callable[[Located], Located] | None = None,
          target_edit: Callable[[Located], Located] | None = None, control: str = "",
          source: Source | None = None, target_model=None, say=print) -> Path:
    """Write the merged target to `out` and return it. `out` must not exist or be empty, unless
    `overwrite`, which replaces an earlier merge only once the new folder is complete.
    A study's control arms change the plan: `source_edit` replaces the source's selection
    before translation, `target_edit` the target's neurons the deltas go to; `control` says
    which in the report. `source` and `target_model` (model, tokenizer): models already loaded
    (a study merges every budget of a run it has just trained); the target is copied, not changed."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty (--overwrite replaces it)")
        if not (out / REPORT).is_file():
            raise FileExistsError(f"output folder {out} is not a merged model (no {REPORT}); "
                                  "refusing to overwrite it")
    if rate is not None:  # checked like merge.rate in a config, before any model loads
        cfg = replace(cfg, merge=replace(cfg.merge, rate=rate))
        check_inputs(validate(cfg) or cfg)
    rate = cfg.merge.rate if cfg.merge.rate is not None else cfg.transfer.rate
    state = ckpt.load_checkpoint(cfg.run_dir, step)  # fails early if the run has no such step
    examples = merge_examples(cfg)

    source = source or Source(cfg)
    dtype = cfg.merge.dtype or cfg.target.dtype
    if target_model is not None and dtype == cfg.target.dtype:
        model, tokenizer = target_model
        target = Target(cfg, rate, model=copy.deepcopy(model), tokenizer=tokenizer)
    else:
        target = Target(cfg, rate, dtype=dtype)
    hypernet = load_hypernet(cfg, state, source.arch.shape.hidden, target)
    located_source, located_target, deltas = plan_edit(source, target, hypernet, examples, source_edit,
                                                       target_edit)
    del source  # free the source before the target is written
    overlap = training_overlap(cfg, target, located_target.index, state["step"])  # before the weights change
    survival = merge_into(target.arch, located_target.index, deltas)
    counts = target.counts

    report = {"source": cfg.source.model, "target": cfg.target.model, "run": str(cfg.run_dir),
              "dtype": dtype,
              "step": state["step"], "rate": rate, "locate": cfg.merge.locate,
              "seed_example": {"data": cfg.merge.seed_data or cfg.data.extract, "index": cfg.merge.seed_example,
                               "id": examples[0].id} if cfg.merge.locate == "seed-example" else None,
              "delta_survival": survival, "training_overlap": overlap,
              "modules": {}, **({"control": control} if control else {})}
    for m, d in deltas.items():
        report["modules"][m] = {"neurons_per_layer": counts[m], "layers": [
            {"target_layer": i, "source_layer": int(located_source.layers[m][i]),
             "target_index": located_target.index[m][i].tolist(),
             "source_index": located_source.index[m][i].tolist(),
             "delta_norm": float(d[i].norm())}
            for i in range(d.shape[0])]}

    # replaces an earlier merge (checked above) or an empty folder only once the new one is whole
    ckpt.save_model_folder(target.model, target.tokenizer, out, {REPORT: report})
    say(survival_line(survival, dtype))
    say("neurons shared with training (mean Jaccard of the merge's with each step's): "
        + ", ".join(f"{m} {v['mean']:.2f}" for m, v in overlap.items()))
    return out


def survival_line(survival: dict[str, float], dtype: str) -> str:
    """What `laten merge` prints of the delta's survival, with a warning when most of it is gone."""
    modules = ", ".join(f"{m} {100 * v:.1f}%" for m, v in survival.items() if m != "all")
    line = f"delta survival: {100 * survival['all']:.1f}% of the trained delta is in the saved {dtype} weights ({modules})"
    if survival["all"] < 0.5:
        line += (f"\nwarning: less than half of the trained delta survived rounding to {dtype}; the merged model "
                 "is close to the target. Merge in float32 to keep it: merge.dtype=float32 (the saved model is "
                 "then float32)")
    return line

