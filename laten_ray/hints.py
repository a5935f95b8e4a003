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


def run_folder_given(spec: str) -> str | None:
    """The message for a run folder given where a model is expected, or None if it is not one."""
    if folder_kind(spec) != "run":
        return None
    merged = Path(spec) / "merged"
    then = f"give {str(merged)!r}" if merged.is_dir() else f"merge it first (laten merge --run {spec}), then give {merged}"
    return f"{spec!r} is a LaTen run folder, not a model: {then}"


def merged_folder_given(folder: str) -> str | None:
    """The message for a merged model folder given where a run folder is expected, or None."""
    if folder_kind(folder) != "merged":
        return None
    return (f"{folder!r} is a merged model folder, not a run folder: its run is {str(Path(folder).parent)!r} "
            "(merge takes the run folder; evaluate, serve and analyze take the merged one)")


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


def option_as_override(schemas: list[tuple[str, type, tuple | None]], argv: list[str],
                       unknown: list[str]) -> str | None:
    """For `--lr 1e-3` given to a command whose settings are key=value overrides: a message
    that says `train.lr=1e-3` (every key of that name), or None when no key has that name.
    `schemas`: (key prefix, dataclass of the settings, allowed first parts or None)."""
    for word in unknown:
        if not word.startswith("--"):
            continue
        name, _, value = word[2:].partition("=")
        at = argv.index(word) if word in argv else -1
        if not value and 0 <= at < len(argv) - 1 and not argv[at + 1].startswith("-"):
            value = argv[at + 1]
        keys = [prefix + k for prefix, schema, first in schemas
                for k in config_keys_named(name.replace("-", "_"), schema)
                if first is None or k.split(".")[0] in first]
        if keys:
            shown = " or ".join(f"{k}={value or 'VALUE'}" for k in keys)
            return (f"unrecognized option --{name}: a config value is given as key=value after the "
                    f"options: {shown}")
    return None
