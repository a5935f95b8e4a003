"""The half-sentence that turns a newcomer's error into its fix: a path that nearly exists, a
run folder given for a model (and the reverse), a config value given as an option."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

MERGE_REPORT = "laten_merge.json"  # what `laten merge` writes into a merged folder


def nearby(given: str | Path, base: Path | None = None) -> str:
    """'; did you mean X?' when changing the missing parts of `given` to the closest names that
    exist gives a path that exists (data/gsm8k/x.jsonl -> data/gsm/x.jsonl), else ''. A
    relative `given` is looked up under `base` (default: the working directory)."""
    given = Path(given)
    start = Path(given.anchor) if given.is_absolute() else (base or Path("."))
    parts = given.parts[1:] if given.is_absolute() else given.parts
    fixed: list[str] = []
    for part in parts:
        folder = start.joinpath(*fixed)
        if part in (".", "..") or (folder / part).exists():
            fixed.append(part)
            continue
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            return ""
        close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
        if not close:
            return ""
        fixed.append(close[0])
    if list(parts) == fixed or not start.joinpath(*fixed).exists():
        return ""
    shown = Path(given.anchor, *fixed) if given.is_absolute() else Path(*fixed)
    return f"; did you mean {str(shown)!r}?"


def folder_kind(path: str | Path) -> str | None:
    """'run' for a LaTen run folder (config.yaml and checkpoints/), 'merged' for a merged model
    folder (laten_merge.json), else None."""
    path = Path(path)
    if (path / MERGE_REPORT).is_file():
        return "merged"
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    return None


def not_a_model(spec: str) -> str:
    """Why a folder given as a model is not one, when it is a run folder."""
    if folder_kind(spec) == "run":
        merged = Path(spec) / "merged"
        then = f" and give {str(merged)!r}" if merged.is_dir() else f" (laten merge --run {spec}), then give {merged}"
        return f"; {spec!r} is a LaTen run folder, not a model: merge it{then}"
    return nearby(spec)


def not_a_run(folder: str) -> str:
    """Why a folder given as a run folder is not one, when it is a merged model."""
    if folder_kind(folder) == "merged":
        return (f"; {folder!r} is a merged model folder, not a run folder: its run is "
                f"{str(Path(folder).parent)!r} (merge takes the run; evaluate, serve and analyze take the merged folder)")
    return nearby(folder)


def config_keys_named(leaf: str, schema, prefix: str = "") -> list[str]:
    """Dotted keys of the dataclass `schema` whose last part is `leaf` (train.lr for lr)."""
    found = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name == leaf:
            found.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            found += config_keys_named(leaf, hints[f.name], key + ".")
    return found


def option_as_override(extra: list[str], schemas: dict[str, type]) -> str | None:
    """For `--lr 1e-3` given to a command whose settings are key=value overrides: the message
    that says `train.lr=1e-3`. `schemas`: key prefix -> dataclass of the config's sections."""
    for i, word in enumerate(extra):
        if not word.startswith("--"):
            continue
        name, _, value = word[2:].partition("=")
        if not value and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value = extra[i + 1]
        keys = [k for prefix, schema in schemas.items()
                for k in config_keys_named(name.replace("-", "_"), schema, prefix)]
        if keys:
            shown = " or ".join(f"{k}={value or 'VALUE'}" for k in keys)
            return (f"unrecognized option {word.split('=')[0]}: config values are given as key=value "
                    f"overrides after the options, e.g. {shown}")
    return None
