"""Merge (docs/method.md §7): translate slices with a trained hypernetwork and add them into the
target's weights for real, writing an ordinary HF model folder. Needs the run's checkpoint and
the seed example only: no training data, no optimizer."""
from __future__ import annotations

import copy
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


def plan_edit(source: Source, target: Target, hypernet: HyperNet, example, source_edit=None,
              target_edit=None):
    """Locate on `example` on both sides (K from `target.counts`) and translate the source's
    slices: (source selection, target selection, deltas {module: [L_t, K, d_t]})."""
    (located_source,) = source.locate([example], target.arch.shape, target.counts)
    (located_target,) = target.locate([example])
    if source_edit:
        located_source = source_edit(located_source)
    if target_edit:
        located_target = target_edit(located_target)
    with torch.no_grad():
        deltas = hypernet(located_source.slices)
    return located_source, located_target, deltas


def load_hypernet(cfg: Config, state: dict, d_source: int, target: Target) -> HyperNet:
    hypernet = make_hypernet(cfg, d_source, target.arch.shape.hidden).to(target.model.device)
    hypernet.load_state_dict(state["hypernet"])
    return hypernet


def merge(cfg: Config, step: int | None, rate: float | None, out: str | Path,
          overwrite: bool = False, source_edit: Callable[[Located], Located] | None = None,
          target_edit: Callable[[Located], Located] | None = None, control: str = "",
          source: Source | None = None, target_model=None) -> Path:
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
    example = seed_example(cfg)

    source = source or Source(cfg)
    dtype = cfg.merge.dtype or cfg.target.dtype
    if target_model is not None and dtype == cfg.target.dtype:
        model, tokenizer = target_model
        target = Target(cfg, rate, model=copy.deepcopy(model), tokenizer=tokenizer)
    else:
        target = Target(cfg, rate, dtype=dtype)
    hypernet = load_hypernet(cfg, state, source.arch.shape.hidden, target)
    located_source, located_target, deltas = plan_edit(source, target, hypernet, example, source_edit,
                                                       target_edit)
    del source  # free the source before the target is written
    merge_into(target.arch, located_target.index, deltas)
    counts = target.counts

    report = {"source": cfg.source.model, "target": cfg.target.model, "run": str(cfg.run_dir),
              "dtype": dtype,
              "step": state["step"], "rate": rate, "seed_example": {"data": cfg.merge.seed_data
              or cfg.data.extract, "index": cfg.merge.seed_example, "id": example.id},
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
    return out

