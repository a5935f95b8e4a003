"""A study's units of work: one per (arm, seed), each in a folder named by the hash of what
determines it, so a rerun finds finished work and a changed setting gets a new folder. A trained
arm's unit trains once to the largest budget and keeps a model per budget; each is evaluated.

    STUDY_DIR/arms/laten-s1-3f9c0a12be/
        built.json            written last by the build: the models, metrics file, seconds, hardware
        run/ model-64/ sft/   what the arm made (its training run, an HF folder per budget, ...)
        eval-8d1e44f0a2-b64/  the evaluation of budget 64 (examples.jsonl, summary.json), named by
                              the hash of the task, items and protocol (no -bN: an untrained arm)
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from .arms import ARMS, budget_key, data_fingerprint
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
    eval_key: str                     # the evaluation's hash (task, items, protocol, engine)
    budgets: list[int | None]         # [None]: one model (an untrained arm, or no budgets)
    needs: dict[str, Path] = field(default_factory=dict)  # arm -> folder of the unit it reads

    @property
    def label(self) -> str:
        return self.arm if self.seed is None else f"{self.arm} seed {self.seed}"

    def eval_dir(self, budget: int | None) -> Path:
        return self.folder / (f"eval-{self.eval_key}" if budget is None else f"eval-{self.eval_key}-b{budget}")

    def built(self) -> dict | None:
        """The build's record if it finished for this very key, else None."""
        path = self.folder / BUILT
        if not path.is_file():
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if info.get("hash") == self.hash else None

    def evaluated(self, budget: int | None) -> dict | None:
        path = self.eval_dir(budget) / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def model_path(self, info: dict, budget: int | None) -> str:
        """The model of `budget`: a spec (an untrained arm) or a folder of the unit's."""
        if info.get("as_is"):
            return info["model"]
        return str(self.folder / info["models"][budget_key(budget)])


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
        budgets = study.budget_list if ARMS[arm].seeded else [None]
        units[arm, seed] = Unit(arm, seed, h, folder, ev, budgets, {n: units[n, seed].folder for n in ARMS[arm].needs})
    return list(units.values())


@dataclass(frozen=True)
class BuildUnit:
    """What a worker needs to build one unit: the study, checked once on the driver, and the unit."""
    study: StudyConfig
    arm: str
    seed: int | None
    folder: str
    needs: dict[str, str]        # arm -> the folder of the unit it reads
    hash: str
    threads: int

    @staticmethod
    def of(study: StudyConfig, unit: Unit, threads: int) -> "BuildUnit":
        return BuildUnit(study, unit.arm, unit.seed, str(unit.folder), {k: str(v) for k, v in unit.needs.items()},
                         unit.hash, threads)


def build_unit(msg: BuildUnit) -> dict:
    """Build one unit (in a Ray task, or in this process) and record it in built.json."""
    import torch

    from ..entry import set_process_defaults
    from ..models import hardware
    set_process_defaults()  # no library progress bars in a worker's log
    torch.set_num_threads(max(1, msg.threads))
    folder = Path(msg.folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = ARMS[msg.arm].build(msg.study, msg.seed, folder, {k: Path(v) for k, v in msg.needs.items()})
    info.update(arm=msg.arm, seed=msg.seed, hash=msg.hash, build_s=time.perf_counter() - t0)
    info.setdefault("hardware", hardware())  # a Ray Train run's is its rank 0's (study/ray_train.py)
    ckpt.save_json(info, folder / BUILT)
    return info


def write_plan(study: StudyConfig, units: list[Unit]) -> dict:
    """plan.json: the units and the fingerprints of the models and data, for `laten report`."""
    from .arms import model_fingerprint
    t = study.task
    info = {"study": study.name, "units": [{"arm": u.arm, "seed": u.seed, "hash": u.hash,
                                             "folder": str(u.folder.relative_to(study.study_dir)),
                                             "evals": {budget_key(b): str(u.eval_dir(b).relative_to(study.study_dir))
                                                       for b in u.budgets}} for u in units],
            "budgets": study.budget_list,
            "models": {role: model_fingerprint(getattr(study, role).model) for role in ("source", "target")},
            "data": {k: data_fingerprint(getattr(t, k)) for k in ("align", "extract", "eval")},
            "config": study.to_dict()}
    ckpt.save_json(info, Path(study.study_dir) / PLAN)
    return info
