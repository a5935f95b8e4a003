"""Checks of a run's inputs before any model loads: the model specs and their config.json
(family, vocabulary, depth, enough source neurons for K) and the data specs. Every failure is a
ConfigError that names the key."""
from __future__ import annotations

from pathlib import Path

from .arch import shape_of
from .config import DATA_KEYS, Config, ConfigError, config_from_dict, read_tree
from .locate import neuron_counts
from .models import check_spec, read_model_config
from .records import DataError, check_spec as check_data_spec


def load_checked(path: str | Path, overrides: list[str] = ()) -> Config:
    """load_config, then the checks of models and data; errors name the file and key."""
    tree, origins = read_tree(path, overrides, DATA_KEYS)
    with origins.naming(path):
        return check_inputs(config_from_dict(tree))


def checked_from_dict(tree: dict) -> Config:
    """A config as plain data (a run's saved config.yaml, an actor's argument), fully checked."""
    return check_inputs(config_from_dict(tree))


def check_inputs(cfg: Config) -> Config:
    for role in ("source", "target"):
        try:
            check_spec(getattr(cfg, role).model)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{role}.model: {e}") from None
    keys = {"data.align": cfg.data.align, "data.extract": cfg.data.extract}
    if cfg.merge.seed_data:
        keys["merge.seed_data"] = cfg.merge.seed_data
    for key, spec in keys.items():
        try:
            check_data_spec(spec)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None
    check_models_fit(cfg)
    if not cfg.data.align.startswith("hf:"):  # a hub dataset is counted when training reads it
        from .data import read_examples
        try:
            n_align = len(read_examples(cfg.data.align))
        except DataError as e:
            raise ConfigError(f"data.align: {e}") from None
        check_align_per_step(cfg, n_align)
    return cfg


def check_align_per_step(cfg: Config, n_align: int) -> None:
    """Each step draws train.align_per_step distinct align examples: no more than there are."""
    if cfg.train.align_per_step > n_align:
        raise ConfigError(f"train.align_per_step: {cfg.train.align_per_step} align examples per step, but "
                          f"data.align ({cfg.data.align}) has {n_align}; lower align_per_step or add examples")


def check_models_fit(cfg: Config) -> None:
    """From the two config.json files alone (no weights): supported families, one family
    (unless transfer.cross_family), the same vocabulary, a source at least as deep as the target, and enough source neurons for K."""
    shapes = {}
    for role in ("source", "target"):
        try:
            shapes[role] = shape_of(read_model_config(getattr(cfg, role).model))
        except ValueError as e:
            raise ConfigError(f"{role}.model: {e}") from None
    src, tgt = shapes["source"], shapes["target"]
    if src.family != tgt.family and not cfg.transfer.cross_family:
        raise ConfigError(f"target.model: a {tgt.family} model, but the source is a {src.family} model; LaTen "
                          "moves neurons between models of one family (docs/method.md). To try it across "
                          "families anyway, set transfer.cross_family: true")
    if src.vocab != tgt.vocab:
        raise ConfigError(f"source.model: vocabulary size {src.vocab} differs from the target's "
                          f"{tgt.vocab}; LaTen needs models of one family and tokenizer")
    if src.n_layers < tgt.n_layers:
        raise ConfigError(f"source.model: {src.n_layers} layers, fewer than the target's {tgt.n_layers}")
    for key, rate in (("transfer.rate", cfg.transfer.rate), ("merge.rate", cfg.merge.rate)):
        if rate is None:
            continue
        for module, k in neuron_counts(tgt, rate, cfg.transfer.modules).items():
            if k > src.neurons(module):
                raise ConfigError(f"{key}: {rate} asks for K={k} {module} neurons per layer but the "
                                  f"source has {src.neurons(module)}; lower the rate")
