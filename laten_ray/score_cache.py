"""A disk cache of attribution scores (docs/method.md §1), so that a study attributes each
(model, example) once, whatever the step, seed, budget or arm that asks.

One file per (model, example): <folder>/<model hash>/<example hash>.safetensors holds that
example's `Scores`. Misses are attributed together in one batch. The batch an example was
attributed in moves its scores by rounding only (measured on the demo pair, an example alone
against in a group of 8: at most 1.5e-5 of the largest score, and the same selected neurons;
tests/test_score_cache.py checks both with a bound of 1e-4), so the
key leaves the batch out: a hit returns the scores of the batch that first computed them. A
lock per model makes "first" exact across processes: a second asker waits and reads the file,
and `computed.log` beside the files lists every example ever computed (one line each).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors.torch import load, save

from .attribution import Scores
from .checkpoint import save_bytes
from .data import Example, attribution_ids, attribution_text

# Bump whenever the scores' formula, their inputs, the summation order or the file layout change
# (3: attribution ids with the tokenizer's BOS, data.attribution_ids).
CACHE_VERSION = 3
ENV = "LATEN_ATTRIBUTION_CACHE"  # the folder when the config names none (a study's runs share it)
FIELDS = ("layer_attn", "layer_ffn", "ffn", "attn")  # Scores.tensors(): [L], [L], [L, f], [L, A]
COMPUTED = "computed.log"


def cache_folder(configured: str) -> str:
    """`attribution.cache`, else $LATEN_ATTRIBUTION_CACHE, else "" (off). A relative path is
    relative to the working directory of the process that attributes."""
    return configured or os.environ.get(ENV, "")


def model_hash(model) -> str:
    """sha256 over the config (path left out) and every state-dict tensor's name, dtype, shape
    and raw bytes: two loads of the same weights share their entries, any other weights not."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(getattr(model.config, "_attn_implementation", None)).encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        # bytes of any dtype (bf16 has no numpy type); reshape(-1) also covers 0-d tensors
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def hardware(device: torch.device) -> dict:
    """What picks the kernels, and so the bits: CPU capability and threads, or the GPU and its
    bf16 reduction mode. (The float32 matmul mode is attribution.precision's, set for the
    attribution alone, so the process's own setting does not count.)"""
    out = {"device": device.type}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device),
                   bf16_reduced=torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    else:
        out.update(cpu=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return out


def _checksum(tensors: dict[str, torch.Tensor], key_text: str) -> str:
    h = hashlib.sha256(key_text.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _metadata(data: bytes) -> dict:
    """The __metadata__ of safetensors bytes: 8 bytes of header length, then the JSON header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


class ScoreCache:
    """The cache folder seen from one loaded model, whose weights must not change while it is
    used (the hash is taken once, on first use)."""

    def __init__(self, folder: str | os.PathLike, model):
        self.folder, self.model = Path(folder), model
        self._model_hash: str | None = None

    @property
    def model_hash(self) -> str:
        if self._model_hash is None:
            self._model_hash = model_hash(self.model)
        return self._model_hash

    def key(self, tokenizer, example: Example, chunk_mb: int, precision: str = "float32",
            kernel: str = "series") -> dict:
        """Everything that changes a score beyond the last bits: code, libraries, weights, dtype,
        hardware, the projection's chunking, precision and kernel, and the example (its text, ids
        and attributed token)."""
        device = next(self.model.parameters()).device
        ids, w = attribution_ids(tokenizer, example)
        return {"version": CACHE_VERSION, "torch": torch.__version__,
                "transformers": transformers.__version__, "model": self.model_hash,
                "dtype": str(self.model.dtype), "hardware": hardware(device), "chunk_mb": chunk_mb,
                "precision": precision, "kernel": kernel,
                "example": {"text": attribution_text(example), "ids": ids, "token": w}}

    def _dir(self) -> Path:
        return self.folder / self.model_hash[:32]

    def path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self._dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.safetensors"

    def get(self, key: dict) -> Scores | None:
        """The example's scores, or None when absent, unreadable, truncated or not matching (a
        killed writer, bad bytes): the caller recomputes and overwrites."""
        try:
            data = self.path(key).read_bytes()
        except OSError:  # absent, or unreadable: computed again
            return None
        key_text = json.dumps(key, sort_keys=True)
        try:
            tensors = load(data)
            meta = _metadata(data)
            ok = meta.get("key") == key_text and meta.get("checksum") == _checksum(tensors, key_text)
            scores = Scores(*(tensors[f] for f in FIELDS), n_examples=1)
        except Exception:  # noqa: BLE001 - any damage reads as a miss, never a crash
            return None
        return scores if ok else None

    def put(self, key: dict, scores: Scores) -> None:
        """Write the example's scores atomically (checkpoint.save_bytes: a temporary name in the
        same folder, fsync, os.replace), so concurrent readers see either no file or a whole one.
        A failed write only warns: the run has its scores either way."""
        path = self.path(key)
        key_text = json.dumps(key, sort_keys=True)
        tensors = {f: t.detach().to(torch.float32).contiguous().clone() for f, t in scores.tensors().items()}
        data = save(tensors, metadata={"key": key_text, "checksum": _checksum(tensors, key_text)})
        try:
            save_bytes(data, path)
        except OSError as e:
            warnings.warn(f"attribution cache: could not write {path}: {e}")

    def note_computed(self, key: dict) -> None:
        """One line in computed.log: this example was attributed (not read) here."""
        try:
            with open(self._dir() / COMPUTED, "a", encoding="utf-8") as log:  # one short append: atomic
                log.write(f"{self.path(key).stem} {key['example']['text'][:60]!r}\n")
        except OSError:
            pass  # put() has warned already

    @contextmanager
    def lock(self):
        """This model's lock, across processes (released by the kernel if the holder dies). Where
        the folder cannot be written the cache goes on without it."""
        try:
            self._dir().mkdir(parents=True, exist_ok=True)
            f = open(self._dir() / ".lock", "a")
        except OSError:
            yield
            return
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield


def computed(folder: str | os.PathLike) -> dict[str, list[str]]:
    """model hash (32 hex) -> the example files it computed, in order, as computed.log lists them
    (an example listed twice was attributed twice)."""
    out = {}
    for log in sorted(Path(folder).glob(f"*/{COMPUTED}")):
        out[log.parent.name] = [line.split(" ", 1)[0] for line in log.read_text(encoding="utf-8").splitlines()]
    return out
