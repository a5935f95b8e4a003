"""A study's configuration (docs/method.md §10): the pair, the task, the arms, the seeds and the
engine, with the `key=value` overrides of `laten train`. Everything that can be checked without
loading a model is checked here, and every error names the file and key."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, ConfigError, ModelConfig, _build, config_from_dict, read_tree
from ..lora import LoraSettings

DEFAULT_ARMS = ["target", "source", "laten", "laten-random-neurons", "laten-noise-source", "sft-lora", "seeking",
                "distill"]
ENGINES = ("auto", "hf", "vllm")
DATA_KEYS = ("align", "extract", "eval")
# The sections of a LaTen run config a study may set under `laten:`; the pair, the data, the
# seed and the run folder come from the study itself.
LATEN_SECTIONS = ("transfer", "attribution", "hypernet", "train", "merge", "data")
LATEN_DATA_KEYS = ("max_length", "train_on_inputs")


@dataclass
class TaskConfig:
    name: str = ""               # the evaluation task: a name in laten_ray/eval/tasks.py's TASKS
    align: str = ""              # training data (a data spec): LaTen's align split, sft-lora's too
    extract: str = ""            # the examples LaTen locates on, one per step
    eval: str = ""               # the evaluation file (a data spec)
    limit: int | None = None     # its first N items
    evaluation: dict = field(default_factory=dict)  # `laten evaluate` settings: chat_format, shots,
                                                     # mode, max_tokens, temperature, n, k, timeout_s, ...


@dataclass
class DistillSettings:
    max_tokens: int = 512        # the source's answers to the training prompts: greedy, this long at most


@dataclass
class SeekingSettings:
    """Zhong et al.'s post-align transfer (docs/method.md §10); LoRA settings other than the rank
    are `sft`'s."""
    seed_examples: int = 32      # the first N of task.align give the source's sensitivity
    rank: int = 16               # SVD rank of the extracted sub-matrices = the LoRA rank
    data: str = "laten"          # post-alignment data: `laten` (LaTen's examples and steps, as
                                 # sft-lora: equal data), or a data spec trained on for `epochs`
    epochs: int = 3
    gradient_checkpointing: bool = False  # the sensitivity pass with less memory


@dataclass
class Resources:
    """What each arm's Ray work asks for. On a GPU cluster: a GPU per model."""
    num_cpus: float = 1.0        # an arm's training task; also its torch threads
    num_gpus: float = 0.0        # e.g. 2 for LaTen (source and target on cuda:0 and cuda:1)
    eval_num_cpus: float = 1.0   # the evaluator actor of an arm
    eval_num_gpus: float = 0.0
    parallel: int | None = None  # arms at once; default as many as the cluster's resources hold
    train_workers: int = 1       # Ray Train workers of a LoRA arm's training (sft-lora, seeking, distill),
                                 # data-parallel, each with num_cpus and, where num_gpus, one GPU;
                                 # 0: no Ray Train, the build task trains (as before Ray Train)


@dataclass
class StudyConfig:
    name: str = "study"
    output_dir: str = "studies"
    source: ModelConfig = field(default_factory=ModelConfig)
    target: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: object = 3            # a count (seeds 0..n-1) or a list of ints
    budgets: list[int] | None = None  # training steps at which every trained arm is evaluated; it
                                 # trains once to the largest (default: one budget, laten.train.steps)
    engine: str = "auto"         # evaluation engine: auto (vLLM if installed), hf, vllm
    laten: dict = field(default_factory=dict)  # LaTen's settings: transfer, attribution, hypernet,
                                                # train, merge, data.max_length/train_on_inputs
    sft: LoraSettings = field(default_factory=LoraSettings)
    seeking: SeekingSettings = field(default_factory=SeekingSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    ray: Resources = field(default_factory=Resources)

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def budget_list(self) -> list[int | None]:
        """The budgets in ascending order; [None]: one run of laten.train.steps (its default)."""
        return sorted(self.budgets) if self.budgets else [None]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_config(self, seed: int, run_dir: Path | None = None) -> Config:
        """The LaTen run config of one seed (checked), its folder `run_dir`. With budgets it runs
        to the largest, on a schedule whose checkpoints are runs of fewer steps: warm-up over
        warmup_ratio of the smallest budget, then constant (unless laten.train says otherwise)."""
        tree = {section: dict(self.laten.get(section) or {}) for section in LATEN_SECTIONS}
        tree["data"].update(align=self.task.align, extract=self.task.extract)
        if self.budgets:
            train = tree["train"]
            train["steps"] = max(self.budgets)
            train.setdefault("schedule", "constant")
            if train.get("warmup_steps") is None:
                train["warmup_steps"] = round(min(self.budgets) * train.get("warmup_ratio", 0.3))
        run_dir = Path(run_dir) if run_dir else self.study_dir / "run"
        tree.update(name=run_dir.name, output_dir=str(run_dir.parent), seed=seed,
                    source=dataclasses.asdict(self.source), target=dataclasses.asdict(self.target))
        return config_from_dict(tree)


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    """Read, override and check a study config (no model is loaded); ConfigError names the file
    and key. Relative data files are anchored at the config file, or at the working directory
    when an override names them."""
    tree, origins = read_tree(path, overrides, [("task", k) for k in DATA_KEYS], "study config")
    with origins.naming(path):
        return study_from_dict(tree)


def study_from_dict(tree: dict) -> StudyConfig:
    study = _build(StudyConfig, tree)
    check_study(study)
    return study


def check_study(study: StudyConfig) -> None:
    """The checks of values, data files and model configs; nothing is loaded."""
    from ..checks import check_inputs
    from ..eval.evaluate import SETTINGS, sampling_for
    from ..eval.protocol import default_protocol
    from ..eval.tasks import TASKS
    from ..records import DataError, check_spec
    from .arms import ARMS

    if not study.name or "/" in study.name:
        raise ConfigError(f"name: must be a non-empty folder name, got {study.name!r}")
    if study.engine not in ENGINES:
        raise ConfigError(f"engine: {study.engine!r} is not one of {', '.join(ENGINES)}")
    _check_seeds(study.seeds)
    _check_budgets(study)
    if not study.arms:
        raise ConfigError("arms: name at least one arm")
    for i, arm in enumerate(study.arms):
        if arm not in ARMS:
            raise ConfigError(f"arms[{i}]: unknown arm {arm!r} (known: {', '.join(ARMS)})")
        for need in ARMS[arm].needs:
            if need not in study.arms:
                raise ConfigError(f"arms: {arm} needs the {need} arm too (it reuses {need}'s training)")
    if len(set(study.arms)) != len(study.arms):
        raise ConfigError(f"arms: {study.arms} names an arm twice")
    if "target" not in study.arms:
        raise ConfigError("arms: the target arm is needed; every other arm is compared with it")
    t = study.task
    if t.name not in TASKS:
        raise ConfigError(f"task.name: {t.name!r} is not one of {', '.join(TASKS)}")
    for key in ("align", "extract", "eval"):
        spec = getattr(t, key)
        if not spec:
            raise ConfigError(f"task.{key}: missing (a data spec: data/..., FILE.jsonl, DIR, hf:..., demo:SPLIT)")
        try:
            check_spec(spec)
        except DataError as e:
            raise ConfigError(f"task.{key}: {e}") from None
    if t.limit is not None and t.limit < 1:
        raise ConfigError(f"task.limit: must be at least 1, got {t.limit}")
    unknown = sorted(set(t.evaluation) - (SETTINGS - {"engine"}))
    if unknown:
        raise ConfigError(f"task.evaluation: unknown key(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(SETTINGS - {'engine'}))}); the engine is the top-level `engine`")
    try:
        protocol = default_protocol(t.name, t.evaluation)
        sampling_for(t.name, t.evaluation, protocol.format)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"task.evaluation: {e}") from None
    hints = typing.get_type_hints(Config)
    for section, value in study.laten.items():
        if section not in LATEN_SECTIONS:
            raise ConfigError(f"laten.{section}: not a LaTen section (have: {', '.join(LATEN_SECTIONS)}); "
                              "the pair, data and seeds are the study's own keys")
        _build(hints[section], value, f"laten.{section}")  # types and unknown keys, named
    extra = sorted(set(study.laten.get("data") or {}) - set(LATEN_DATA_KEYS))
    if extra:
        raise ConfigError(f"laten.data.{extra[0]}: set the training data as task.align / task.extract")
    try:
        cfg = study.run_config(study.seed_list[0])
    except ConfigError as e:  # a value check of the run config: its key is the study's laten.<key>
        raise ConfigError(f"laten.{e}" if str(e).split(".")[0] in LATEN_SECTIONS else str(e)) from None
    try:
        check_inputs(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("data.align", "task.align").replace("data.extract", "task.extract")
                          .replace("transfer.", "laten.transfer.").replace("merge.", "laten.merge.")
                          .replace("train.align_per_step", "laten.train.align_per_step")) from None
    k = study.seeking
    _each("seeking", {"seed_examples": k.seed_examples, "rank": k.rank, "epochs": k.epochs},
          lambda v: v >= 1, "must be at least 1")
    if k.data != "laten":
        try:
            check_spec(k.data)
        except DataError as e:
            raise ConfigError(f"seeking.data: {e} (or `laten`: LaTen's examples)") from None
    if study.distill.max_tokens < 1:
        raise ConfigError(f"distill.max_tokens: must be at least 1, got {study.distill.max_tokens}")
    s, r = study.sft, study.ray
    _each("sft", {"rank": s.rank}, lambda v: v >= 1, "must be at least 1")
    _each("sft", {"alpha": s.alpha, "lr": s.lr}, lambda v: v > 0, "must be positive")
    _each("sft", {"dropout": s.dropout}, lambda v: 0 <= v < 1, "must be in [0, 1)")
    _each("sft", {"modules": s.modules}, bool, "must name at least one module")
    _each("ray", {k: getattr(r, k) for k in ("num_cpus", "num_gpus", "eval_num_cpus", "eval_num_gpus")},
          lambda v: v >= 0, "must not be negative")
    _each("ray", {"parallel": r.parallel}, lambda v: v is None or v >= 1, "must be at least 1")
    _each("ray", {"train_workers": r.train_workers}, lambda v: v >= 0, "must not be negative")  # its type: _build


def _check_budgets(study: StudyConfig) -> None:
    b = study.budgets
    if b is None:
        return
    if not isinstance(b, list) or not b:
        raise ConfigError(f"budgets: expected a list of step counts, e.g. [8, 64, 512], got {b!r}")
    for i, n in enumerate(b):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"budgets[{i}]: expected a positive number of training steps, got {n!r}")
    if len(set(b)) != len(b):
        raise ConfigError(f"budgets: {b} repeats a budget")
    train = study.laten.get("train") or {}
    if isinstance(train, dict) and train.get("steps") is not None:
        raise ConfigError("laten.train.steps: a study with budgets trains to its largest budget; "
                          "set `budgets` instead")
    if len(b) > 1 and isinstance(train, dict) and train.get("schedule") == "one-cycle":
        raise ConfigError("laten.train.schedule: one-cycle decays to the run's end, so its checkpoints are not "
                          "runs of fewer steps; several budgets need `constant`")
    if len(b) > 1 and "seeking" in study.arms and study.seeking.data != "laten":
        raise ConfigError("seeking.data: several budgets need seeking to train on LaTen's steps (`laten`)")


def _check_seeds(seeds) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, (int, list)):
        raise ConfigError(f"seeds: expected a count or a list of ints, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds: the count must be at least 1, got {seeds}")
        return
    if not seeds:
        raise ConfigError("seeds: the list is empty")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"seeds[{i}]: expected a non-negative int, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds: {seeds} repeats a seed")


def _each(section: str, values: dict, ok, problem: str) -> None:
    """ConfigError naming the first `section.key` whose value is not `ok`."""
    for key, value in values.items():
        if not ok(value):
            raise ConfigError(f"{section}.{key}: {problem}, got {value!r}")
