"""A study's units of work: one per (arm, seed), each in a folder named by the hash of what
determines it, so a rerun finds finished work and a changed setting gets a new folder.

    STUDY_DIR/arms/laten-s1-3f9c0a12be/
        built.json            written last by the build: the model, metrics file, seconds, hardware
        run/ model/ sft/      what the arm made (its training run, its HF folder, ...)
        eval-8d1e44f0a2/      the evaluation (examples.jsonl, summary.json), named by the hash of
                              the task, items and protocol
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from .arms import ARMS, data_fingerprint
from .config import StudyConfig

BUILT = "built.json"
PLAN = "plan.json"


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Unit:
    arm: str
    seed: int | None                  # None: an arm with one model for every seed
    hash: str
    folder: Path
    eval_dir: Path
    needs: dict[str, Path] = field(default_factory=dict)  # arm -> folder of the unit it reads

    @property
    def label(self) -> str:
        return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"

    def built(self) -> dict | None:
        """The build's record if it finished for this very key, else None."""
        path = self.folder / BUILT
        if not path.is_file():
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if info.get("hash") == self.hash else None

    def evaluated(self) -> dict | None:
        path = self.eval_dir / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def model_path(self, info: dict) -> str:
        return info["model"] if info.get("as_is") else str(self.folder / info["model"])


def eval_key(study: StudyConfig) -> dict:
    t = study.task
    return {"task": t.name, "eval": data_fingerprint(t.eval), "limit": t.limit, "evaluation": t.evaluation,
            "engine": study.engine}


def plan(study: StudyConfig) -> list[Unit]:
    """Every unit of the study, seed by seed in the order of `arms`; arms without seeds first."""
    root = Path(study.study_dir) / "arms"
    ev = digest(eval_key(study))[:10]
    units: dict[tuple[str, int | None], Unit] = {}
    order = [(a, None) for a in study.arms if not ARMS[a].seeded] + \
            [(a, s) for s in study.seed_list for a in study.arms if ARMS[a].seeded]
    for arm, seed in order:
        h = digest({"arm": arm, "seed": seed, **ARMS[arm].key(study, seed)})
        folder = root / (f"{arm}-{h[:10]}" if seed is None else f"{arm}-s{seed}-{h[:10]}")
        units[arm, seed] = Unit(arm, seed, h, folder, folder / f"eval-{ev}",
                                {n: units[n, seed].folder for n in ARMS[arm].needs})
    return list(units.values())


def hardware() -> dict:
    """Where a unit ran: host, CPU, the CPUs this process may use, its torch threads, GPUs."""
    import torch
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"host": platform.node(), "cpu": cpu, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}


def build_unit(study_tree: dict, arm: str, seed: int | None, folder: str, needs: dict, unit_hash: str,
               threads: int) -> dict:
    """Build one unit (in a Ray task, or in this process) and record it in built.json."""
    import torch

    from ..entry import set_process_defaults
    from .config import study_from_dict
    set_process_defaults()  # no library progress bars in a worker's log
    torch.set_num_threads(max(1, threads))
    study = study_from_dict(study_tree)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = ARMS[arm].build(study, seed, folder, {k: Path(v) for k, v in needs.items()})
    info.update(arm=arm, seed=seed, hash=unit_hash, build_s=time.perf_counter() - t0, hardware=hardware())
    ckpt.save_json(info, folder / BUILT)
    return info


def write_plan(study: StudyConfig, units: list[Unit]) -> dict:
    """plan.json: the units and the fingerprints of the models and data, for `laten report`."""
    from .arms import model_fingerprint
    t = study.task
    info = {"study": study.name, "units": [{"arm": u.arm, "seed": u.seed, "hash": u.hash,
                                             "folder": str(u.folder.relative_to(study.study_dir)),
                                             "eval": str(u.eval_dir.relative_to(study.study_dir))} for u in units],
            "models": {role: model_fingerprint(getattr(study, role).model) for role in ("source", "target")},
            "data": {k: data_fingerprint(getattr(t, k)) for k in ("align", "extract", "eval")},
            "config": study.to_dict()}
    ckpt.save_json(info, Path(study.study_dir) / PLAN)
    return info
