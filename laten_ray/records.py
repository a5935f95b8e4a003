"""Where data comes from. A data spec is one of:

  data/...            a file of this repository's data folder (data/README.md), wherever you run
  PATH.jsonl          one JSON object per line
  DIR                 a folder written by `datasets.Dataset.save_to_disk` (DIR:SPLIT for a DatasetDict)
  hf:NAME[:CONFIG]:SPLIT  a dataset loaded with `datasets.load_dataset` (hub, its cache, or a local folder)
  demo:SPLIT          the built-in demo task (laten_ray/builtin/demo.py)

Every spec yields (where, record) pairs: `where` names the file and line (or dataset and row)
for error messages, `record` is a plain dict.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from .builtin import cache_dir, demo
from .hints import nearby

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_PREFIX = "data/"


class DataError(ValueError):
    """A bad data file or spec; the message names the file and line (or the spec)."""


def resolve_path(spec: str) -> Path:
    """A `data/...` spec is the repository's data folder whatever the working directory (a
    `ray job submit` upload included); other paths are taken as they are."""
    if spec.startswith(DATA_PREFIX):
        in_repo = REPO_ROOT / spec
        if in_repo.exists() or not Path(spec).exists():
            return in_repo
    return Path(spec)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def _split_folder_spec(spec: str) -> tuple[Path, str | None]:
    """DIR or DIR:SPLIT (the split of a DatasetDict folder)."""
    path = resolve_path(spec)
    if not path.exists() and ":" in spec:
        head, split = spec.rsplit(":", 1)
        folder = resolve_path(head)
        if is_saved_dataset(folder):
            return folder, split
    return path, None


def check_spec(spec: str | Path) -> None:
    """Fail now, before any model loads, for a spec that cannot name data (a missing file,
    an unknown demo split, a malformed hf: spec). hf: specs are not fetched here."""
    spec = str(spec)
    if spec.startswith("demo:"):
        if spec[5:] not in demo.SPLITS:
            raise DataError(f"unknown demo split {spec!r} (have: {', '.join('demo:' + s for s in demo.SPLITS)})")
    elif spec.startswith("hf:"):
        _hf_parts(spec)
    else:
        path, _ = _split_folder_spec(spec)
        if not (path.is_file() or is_saved_dataset(path)):
            what = "folder is not a saved dataset (no dataset_info.json)" if path.is_dir() else "not found"
            hint = "" if path.is_dir() else nearby(spec, REPO_ROOT if spec.startswith(DATA_PREFIX) else None)
            raise DataError(f"data file {spec!r} {what}"
                            + (f" (looked at {path})" if str(path) != spec else "") + hint)


def _hf_parts(spec: str) -> tuple[str, str | None, str]:
    parts = spec[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT, e.g. "
                        "hf:openai/gsm8k:main:test")
    return parts[0], (parts[1] if len(parts) == 3 else None), parts[-1]


def read_records(spec: str | Path, limit: int | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a spec, the first `limit` only if given."""
    spec = str(spec)
    if limit is not None and limit < 1:
        raise DataError(f"{spec}: limit must be at least 1, got {limit}")
    check_spec(spec)
    if spec.startswith("demo:"):
        path = demo.write_split(spec[5:], cache_dir() / "demo")
        yield from _jsonl(path, limit)
    elif spec.startswith("hf:"):
        yield from _dataset_rows(_load_hf(spec), spec, limit)
    else:
        path, split = _split_folder_spec(spec)
        if path.is_file():
            yield from _jsonl(path, limit)
        else:
            yield from _dataset_rows(_load_saved(path, split, spec), spec, limit)


def _jsonl(path: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    """Blank lines are skipped but counted, so line numbers are the editor's."""
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object")
            yield where, record
            count += 1
            if limit is not None and count >= limit:
                return


def _load_hf(spec: str):
    import datasets
    name, config, split = _hf_parts(spec)
    try:
        return datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise DataError(f"{spec}: datasets could not load it ({type(e).__name__}: {e}); without network, "
                        "set HF_DATASETS_OFFLINE=1 and use a dataset in the cache, or a local folder") from None


def _load_saved(path: Path, split: str | None, spec: str):
    import datasets
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise DataError(f"{spec}: the saved dataset has splits {', '.join(loaded)}; name one as "
                            f"{path}:SPLIT")
        return loaded[split]
    if split is not None:
        raise DataError(f"{spec}: {path} is a single dataset, not a DatasetDict with splits")
    return loaded


def _dataset_rows(dataset, spec: str, limit: int | None) -> Iterator[tuple[str, dict]]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        yield f"{spec} row {i}", dict(dataset[i])
