"""Identities of models and data that do not depend on how their paths are spelled: a model by
its config.json and weight files, a data spec by the records it yields. Study units and run
folders are keyed by them."""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .records import read_records


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> tuple | None:
    """When a file last changed: a cached fingerprint is read again after an edit."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def model_fingerprint(spec: str) -> dict:
    """A model by its spec, its config.json's hash and its weight files' names and sizes (a
    folder's weights are not read whole: a 13B model would take minutes)."""
    from .models import resolve
    folder = resolve(spec)
    return _model_fingerprint(spec, folder, _stamp(folder / "config.json"))


@functools.cache  # a study asks for each many times
def _model_fingerprint(spec: str, folder: Path, stamp) -> dict:
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin", ".pt"))
    return {"spec": spec, "config": file_digest(folder / "config.json"), "weights": weights}


def data_fingerprint(spec: str) -> dict:
    """A data spec and the sha256 of its records as read (any kind of spec), with their count."""
    from .records import resolve_path
    return _data_fingerprint(spec, _stamp(resolve_path(spec)))


@functools.cache
def _data_fingerprint(spec: str, stamp) -> dict:
    h, n = hashlib.sha256(), 0
    for _, record in read_records(spec):
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        n += 1
    return {"spec": spec, "sha256": h.hexdigest(), "records": n}
