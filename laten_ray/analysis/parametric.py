"""Parametric similarity of what was injected (docs/method.md §11): per target layer and module,
the cosine of the delta with the target's weight and with the merged weight. A LaTen merge
(a folder with laten_merge.json) is compared on the rows (up, v) or columns (down, o) it
touched; any other fine-tuned copy (a merged LoRA) on every linear matrix of every layer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..arch import NEURON_AXIS, family_of, rows_of, shape_of, weight_name
from ..merge import REPORT
from .neurons import delta_shares

LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


def weight_reader(folder: str | Path) -> Callable[[str], torch.Tensor]:
    """name -> that tensor of an HF folder's safetensors weights, read alone (a sharded folder
    through its index): no whole model in memory."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    if files is None and not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (or its index) here")

    def read(name: str) -> torch.Tensor:
        with safe_open(folder / (files[name] if files else "model.safetensors"), framework="pt") as f:
            return f.get_tensor(name)
    return read


def cosines(delta: torch.Tensor, weight: torch.Tensor) -> dict:
    """cos(delta, W) and cos(delta, W + delta) over all entries, ||delta||, ||delta|| / ||W||;
    cosines are None for a zero delta."""
    d, w = delta.double().flatten(), weight.double().flatten()
    merged = w + d
    dn, wn, mn = float(d.norm()), float(w.norm()), float(merged.norm())
    return {"cos_target": float(d @ w) / (dn * wn) if dn and wn else None,
            "cos_merged": float(d @ merged) / (dn * mn) if dn and mn else None,
            "delta_norm": dn, "relative_norm": dn / wn if wn else None}


def compare(target_folder: str | Path, merged_folder: str | Path) -> dict:
    """{"kind": "laten" | "full", "modules": {module: [cosines(...) + {"layer"} per target layer]}},
    and for a LaTen merge its rate and where its delta norm went (neurons.delta_shares)."""
    from transformers import AutoConfig
    merged_folder = Path(merged_folder)
    config = AutoConfig.from_pretrained(merged_folder)
    family, shape = family_of(config), shape_of(config)
    before, after = weight_reader(target_folder), weight_reader(merged_folder)

    def weight(read, layer: int, module: str) -> torch.Tensor:
        """A module's own weight [out, in] (a fused weight's range of rows)."""
        return read(weight_name(family, layer, module))[rows_of(family, shape, module)]

    report = merged_folder / REPORT
    out: dict = {"kind": "laten" if report.is_file() else "full", "modules": {}}
    if report.is_file():  # only the rows or columns the merge touched
        merge = json.loads(report.read_text())
        out.update(rate=merge.get("rate"), delta_share=delta_shares(merge))
        for module, entry in merge["modules"].items():
            rows = []
            for layer in entry["layers"]:
                i, idx = layer["target_layer"], torch.tensor(layer["target_index"])
                axis = NEURON_AXIS[module]
                w0 = weight(before, i, module).index_select(axis, idx).double()
                w1 = weight(after, i, module).index_select(axis, idx).double()
                rows.append({"layer": i, **cosines(w1 - w0, w0)})
            out["modules"][module] = rows
        return out
    for module in LINEAR:
        rows = []
        for i in range(config.num_hidden_layers):
            w0, w1 = weight(before, i, module).double(), weight(after, i, module).double()
            rows.append({"layer": i, **cosines(w1 - w0, w0)})
        out["modules"][module] = rows
    return out
