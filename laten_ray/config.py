"""Run configuration: the schema (typed dataclasses), YAML parsing, `key=value` overrides and
the checks of values. Checks that read models or data live in checks.py."""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .arch import MODULES

DTYPES = ("float32", "bfloat16", "float16")
# Data specs that are files: relative ones are anchored at the config file (or, given on the
# command line, at the working directory); `data/...` means the repository's data folder.
DATA_KEYS = (("data", "align"), ("data", "extract"), ("merge", "seed_data"))


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-4 (no dot) as a string; here it is a float, as a person means it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class ModelConfig:
    model: str = ""           # HF model folder, or tiny:NAME (a built-in random model)
    dtype: str = "float32"    # float32 | bfloat16 | float16
    device: str = "auto"      # auto | cpu | cuda | cuda:N


@dataclass
class DataConfig:
    align: str = "demo:align"      # a data spec (records.py): data/..., FILE.jsonl, DIR, hf:..., demo:SPLIT
    extract: str = "demo:extract"
    max_length: int = 1024         # LM examples are cut here; batches pad to their longest row
    train_on_inputs: bool = False  # LM loss on the prompt too (the paper does this for MMLU)


@dataclass
class TransferConfig:
    rate: float = 0.1  # K = rate * (target's neurons of each module type)
    modules: list[str] = field(default_factory=lambda: list(MODULES))
    cross_family: bool = False  # allow a source and target of different families (the method
                                # assumes one family; the vocabularies must still be equal)


@dataclass
class AttributionConfig:
    batch_size: int = 8   # examples per forward pass
    chunk_mb: int = 256   # memory for the vocabulary x neuron blocks of the exact scores
    cache: str = ""       # folder of cached scores (score_cache.py; relative to the working
                          # directory); "" = $LATEN_ATTRIBUTION_CACHE, unset = off
    precision: str = "float32"  # matmuls of attribution only: float32, tf32 (GPU), bfloat16
    kernel: str = "series"  # the scoring pass: series (cumulant series where it holds, else exact) or exact


@dataclass
class HyperNetConfig:
    hidden: int | None = None  # width of the hidden layer; default d_source
    init_std: float = 1e-4     # std of the output layer's init (0 = exactly zero deltas at start)


@dataclass
class TrainConfig:
    steps: int | None = None   # default: one step per extract example
    align_per_step: int = 15
    micro_batch_size: int = 4
    lr: float = 3e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_ratio: float = 0.3  # share of steps spent warming up
    schedule: str = "one-cycle"  # one-cycle (the paper's), or constant: warm-up, then the full rate,
                                 # so the checkpoint after B steps is a run of B steps (a study's budgets)
    warmup_steps: int | None = None  # the warm-up in steps; default warmup_ratio x steps
    reg_lambda: float = 1000.0
    gradient_checkpointing: bool = False  # recompute the target's layers in backward: less memory


@dataclass
class MergeConfig:
    seed_example: int = 0     # index of the example located on to pick the neurons
    seed_data: str = ""       # file of that example; default data.extract
    rate: float | None = None  # default transfer.rate
    dtype: str = ""           # dtype of the merged weights; default target.dtype. Small deltas
                              # added to bfloat16 weights partly round away: float32 keeps them
    locate: str = "seed-example"  # the neurons the deltas go to: those of one example (the
                                  # paper's), or extract-sum: of the scores summed over data.extract


@dataclass
class ActorConfig:
    num_cpus: float = 1.0            # also the actor's torch threads (at least 1)
    num_gpus: float | None = None    # default: 1 when the role's device is cuda or cuda:N, else 0


TRANSPORTS = ("object_store", "nccl", "gloo", "nixl", "cuda_ipc")
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
SCHEDULES = ("one-cycle", "constant")
PRECISIONS = ("float32", "tf32", "bfloat16")
MERGE_LOCATES = ("seed-example", "extract-sum")
KERNELS = ("series", "exact")


@dataclass
class RayConfig:
    """How a Ray run places and connects the two actors; it never changes what is computed."""
    lookahead: int = 2               # extract examples the source may run ahead of the target
    transport: str = "object_store"  # slices through the object store, or Ray direct transport:
                                     # nccl (GPU-GPU), cuda_ipc (one GPU), nixl, gloo (CPU)
    placement_strategy: str = "PACK"
    max_restarts: int = 3            # per actor; the run resumes from the last checkpoint
    source: ActorConfig = field(default_factory=ActorConfig)
    target: ActorConfig = field(default_factory=ActorConfig)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    source: ModelConfig = field(default_factory=ModelConfig)
    target: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    hypernet: HyperNetConfig = field(default_factory=HyperNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- building from plain data, with types checked -------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            hint = f"; a list is written in brackets, e.g. '{key}=[{value}]' (quoted on the command line, so the " \
                "shell keeps it one word)" if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected a list, got {value!r}{hint}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls, data, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            hint = "; the target role's actor is configured under ray.target" if where == "ray.trainer" else ""
            raise ConfigError(f"unknown key {where!r} (known here: {', '.join(sorted(known))}){hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


LIST_HINT = "a list on the command line is quoted so the shell keeps it one word, e.g. 'arms=[target, laten]'"


def _set_override(tree: dict, item: str) -> None:
    """Apply `a.b=value` to the raw mapping; the value is read as YAML (so 3, 0.1, true, [a, b])."""
    if "=" not in item:
        hint = f"; {LIST_HINT} (the shell split it at a space)" if item.rstrip().endswith(("]", "}")) else ""
        raise ConfigError(f"override {item!r} is not key=value{hint}")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {k!r} is not a section")
    try:
        node[keys[-1]] = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        hint = f"; {LIST_HINT}" if raw.lstrip().startswith(("[", "{")) else ""
        raise ConfigError(f"override {item!r}: value is not valid YAML ({' '.join(str(e).split())}){hint}") from None


def anchored(spec, base: Path):
    """A relative data file spec made absolute at `base`; data/..., demo:, hf: and absolute
    paths are left as they are (data/ is resolved against the repository when read)."""
    if not isinstance(spec, str) or not spec or spec.startswith(("demo:", "hf:", "data/")) \
            or Path(spec).is_absolute():
        return spec
    return os.path.normpath(base / spec)


def _anchor(tree: dict, base: Path, keys) -> None:
    for section, key in keys:
        node = tree.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = anchored(node[key], base)


BASE_KEY = "base"  # a config names the file it overrides: `base: paper-llama2.yaml`
_KEY_IN_MESSAGE = re.compile(r"^(?:unknown key '([^']+)'|([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\[\d+\])?:)")


class Origins(dict):
    """Where each value of a config tree came from: (key, ...) -> a file, or an override."""

    def record(self, tree, where: str, prefix: tuple = ()) -> None:
        for key, value in tree.items():
            self[(*prefix, key)] = where
            if isinstance(value, dict):
                self.record(value, where, (*prefix, key))

    def of(self, message: str) -> str | None:
        """The origin of the key an error message starts with (`train.lr: ...`,
        `unknown key 'train.lrr'`): the deepest recorded part of it."""
        m = _KEY_IN_MESSAGE.match(message)
        if not m:
            return None
        parts = tuple((m.group(1) or m.group(2)).split("."))
        for n in range(len(parts), 0, -1):
            if parts[:n] in self:
                return self[parts[:n]]
        return None

    @contextmanager
    def naming(self, path):
        """Re-raise a ConfigError with the file (or override) its key came from in front."""
        try:
            yield
        except ConfigError as e:
            raise ConfigError(f"{self.of(str(e)) or path}: {e}") from None


def _merged(under: dict, over: dict) -> dict:
    """`over` on top of `under`: mappings merge key by key, anything else is replaced."""
    out = dict(under)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_file(path: Path, what: str, data_keys, chain: tuple = ()) -> tuple[dict, Origins]:
    """One config file and the bases it names, merged; each file's relative data paths are
    anchored at that file."""
    if not path.is_file():
        from .hints import nearby
        raise ConfigError(f"{what} {str(path)!r} not found{nearby(path)}")
    try:
        tree = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    _anchor(tree, path.resolve().parent, data_keys)
    label = " (base of ".join([str(path), *map(str, reversed(chain))]) + ")" * len(chain)
    base = tree.pop(BASE_KEY, None)
    own, origins = Origins(), Origins()
    own.record(tree, label)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{label}: {BASE_KEY}: expected the file this config overrides, got {base!r}")
        base_path = Path(os.path.normpath(path.parent / base))
        if base_path.resolve() in {p.resolve() for p in (*chain, path)}:
            raise ConfigError(f"{label}: {BASE_KEY}: {base!r} leads back to itself")
        under, origins = _read_file(base_path, f"{path}: {BASE_KEY}:", data_keys, (*chain, path))
        tree = _merged(under, tree)
    origins.update(own)
    return tree, origins


def read_tree(path: str | Path, overrides: list[str], data_keys, what: str = "config file") -> tuple[dict, Origins]:
    """A YAML config as plain data, with the bases it names (`base: FILE`, relative to it) under
    it and `key=value` overrides on top; and where each value came from. The (section, key)
    data file specs in `data_keys` are anchored at the file that gives them, or at the working
    directory when an override does."""
    tree, origins = _read_file(Path(path), what, data_keys)
    overridden = set()
    for item in overrides:
        _set_override(tree, item)
        dotted = tuple(item.split("=", 1)[0].strip().split("."))
        origins.record({dotted[-1]: None}, f"override {item!r}", dotted[:-1])
        overridden.add(dotted)
    _anchor(tree, Path.cwd(), [k for k in data_keys if k in overridden])
    return tree, origins


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read, override, type-check and check the values of a config; raises ConfigError naming
    the file (or override) and key. Relative data files are anchored at the config file that
    gives them, or at the working directory when an override does."""
    tree, origins = read_tree(path, overrides, DATA_KEYS)
    with origins.naming(path):
        cfg = _build(Config, tree)
        validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    cfg = _build(Config, tree)
    validate(cfg)
    return cfg


# --- validation -----------------------------------------------------------------------------

def _check_dtype(dtype: str, key: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"{key}: {dtype!r} is not one of {', '.join(DTYPES)}")


def _check_rate(rate: float, key: str) -> None:
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"{key}: rate must be in (0, 1], got {rate}")


def validate(cfg: Config) -> None:
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"name: must be a non-empty folder name, got {cfg.name!r}")
    for role in ("source", "target"):
        m: ModelConfig = getattr(cfg, role)
        if not m.model:
            raise ConfigError(f"{role}.model: missing (a model folder or tiny:NAME)")
        _check_dtype(m.dtype, f"{role}.dtype")
        if not (m.device in ("auto", "cpu", "cuda") or m.device.startswith("cuda:")):
            raise ConfigError(f"{role}.device: {m.device!r} is not auto, cpu, cuda or cuda:N")
    _check_rate(cfg.transfer.rate, "transfer.rate")
    if cfg.merge.rate is not None:
        _check_rate(cfg.merge.rate, "merge.rate")
    if cfg.merge.dtype:
        _check_dtype(cfg.merge.dtype, "merge.dtype")
    if cfg.merge.locate not in MERGE_LOCATES:
        raise ConfigError(f"merge.locate: {cfg.merge.locate!r} is not one of {', '.join(MERGE_LOCATES)}")
    bad = [m for m in cfg.transfer.modules if m not in MODULES]
    if bad or not cfg.transfer.modules or len(set(cfg.transfer.modules)) != len(cfg.transfer.modules):
        raise ConfigError(f"transfer.modules: {cfg.transfer.modules} must be distinct names from "
                          f"{', '.join(MODULES)}")
    positive = {"data.max_length": cfg.data.max_length,
                "attribution.batch_size": cfg.attribution.batch_size,
                "attribution.chunk_mb": cfg.attribution.chunk_mb,
                "train.micro_batch_size": cfg.train.micro_batch_size,
                "train.steps": cfg.train.steps if cfg.train.steps is not None else 1,
                "hypernet.hidden": cfg.hypernet.hidden if cfg.hypernet.hidden is not None else 1}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}: must be at least 1, got {value}")
    nonneg = {"train.align_per_step": cfg.train.align_per_step, "train.lr": cfg.train.lr,
              "train.weight_decay": cfg.train.weight_decay, "train.reg_lambda": cfg.train.reg_lambda,
              "hypernet.init_std": cfg.hypernet.init_std, "merge.seed_example": cfg.merge.seed_example}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two numbers in [0, 1), got {cfg.train.betas}")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {cfg.train.warmup_ratio}")
    if cfg.train.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule: {cfg.train.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.train.warmup_steps is not None and cfg.train.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps: must not be negative, got {cfg.train.warmup_steps}")
    if cfg.attribution.kernel not in KERNELS:
        raise ConfigError(f"attribution.kernel: {cfg.attribution.kernel!r} is not one of {', '.join(KERNELS)}")
    if cfg.attribution.precision not in PRECISIONS:
        raise ConfigError(f"attribution.precision: {cfg.attribution.precision!r} is not one of {', '.join(PRECISIONS)}")
    if cfg.attribution.cache != cfg.attribution.cache.strip():
        raise ConfigError(f"attribution.cache: a folder path without leading or trailing spaces, "
                          f"got {cfg.attribution.cache!r}")
    _check_ray(cfg)


def _check_ray(cfg: Config) -> None:
    r = cfg.ray
    if r.lookahead < 0:
        raise ConfigError(f"ray.lookahead: must not be negative, got {r.lookahead}")
    if r.max_restarts < 0:
        raise ConfigError(f"ray.max_restarts: must not be negative, got {r.max_restarts}")
    if r.transport not in TRANSPORTS:
        raise ConfigError(f"ray.transport: {r.transport!r} is not one of {', '.join(TRANSPORTS)}")
    if r.placement_strategy not in STRATEGIES:
        raise ConfigError(f"ray.placement_strategy: {r.placement_strategy!r} is not one of "
                          f"{', '.join(STRATEGIES)}")
    for role in ("source", "target"):
        a: ActorConfig = getattr(r, role)
        for key, value in (("num_cpus", a.num_cpus), ("num_gpus", a.num_gpus)):
            if value is not None and value < 0:
                raise ConfigError(f"ray.{role}.{key}: must not be negative, got {value}")
    if r.transport in ("nccl", "cuda_ipc"):
        for role in ("source", "target"):
            if not getattr(cfg, role).device.startswith("cuda"):
                raise ConfigError(f"ray.transport: {r.transport} moves GPU tensors but "
                                  f"{role}.device is {getattr(cfg, role).device!r}")
