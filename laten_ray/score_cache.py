"""A disk cache of attribution scores (docs/method.md §1), so that a study's runs and any rerun
attribute each batch of examples once.

One file per (model, batch): <folder>/<model hash>/<batch hash>.safetensors holds the `Scores`
of every example of the batch, in batch order. Batching moves scores in the last float bits, so
a batch is cached as a whole and its key names every member in order: a hit returns exactly the
tensors the same call would compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import transformers
from safetensors.torch import load, save

from .attribution import Scores
from .checkpoint import save_bytes
from .data import Example, attribution_ids, attribution_text

CACHE_VERSION = 1  # bump whenever the scores' formula or its summation order changes
ENV = "LATEN_ATTRIBUTION_CACHE"  # the folder when the config names none (a study's runs share it)
FIELDS = ("layer_attn", "layer_ffn", "ffn", "attn")  # Scores.tensors(): [L], [L], [L, f], [L, A]


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
    float32/bf16 matmul modes."""
    out = {"device": device.type, "matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(device),
                   tf32=torch.backends.cuda.matmul.allow_tf32,
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

    def key(self, tokenizer, examples: list[Example], batch_size: int, chunk_mb: int, group: int) -> dict:
        """Everything that changes a score's bits: code, libraries, weights, dtype, hardware, the
        batching settings and the whole batch in order (an example's position is its index)."""
        device = next(self.model.parameters()).device
        members = []
        for e in examples:
            ids, w = attribution_ids(tokenizer, e)
            members.append({"text": attribution_text(e), "ids": ids, "token": w})
        return {"version": CACHE_VERSION, "torch": torch.__version__,
                "transformers": transformers.__version__, "model": self.model_hash,
                "dtype": str(self.model.dtype), "hardware": hardware(device),
                "batch_size": batch_size, "chunk_mb": chunk_mb, "group": group, "examples": members}

    def path(self, key: dict) -> Path:
        text = json.dumps(key, sort_keys=True)
        return self.folder / key["model"][:32] / f"{hashlib.sha256(text.encode()).hexdigest()[:40]}.safetensors"

    def get(self, key: dict) -> list[Scores] | None:
        """The batch's scores, or None when absent, unreadable, truncated or not matching (a
        killed writer, bad bytes): the caller recomputes and overwrites."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or unreadable: computed again
            return None
        key_text = json.dumps(key, sort_keys=True)
        try:
            tensors = load(data)
            meta = _metadata(data)
            ok = meta.get("key") == key_text and meta.get("checksum") == _checksum(tensors, key_text)
            n = len(key["examples"])
            each = [Scores(*(tensors[f"{i}.{f}"] for f in FIELDS), n_examples=1) for i in range(n)]
        except Exception:  # noqa: BLE001 - any damage reads as a miss, never a crash
            return None
        return each if ok else None

    def put(self, key: dict, each: list[Scores]) -> None:
        """Write the batch's scores atomically (checkpoint.save_bytes: a temporary name in the same
        folder, fsync, os.replace), so concurrent readers and writers of the same key see either
        no file or a whole one. A failed write only warns: the run has its scores either way."""
        path = self.path(key)
        key_text = json.dumps(key, sort_keys=True)
        tensors = {f"{i}.{f}": t.detach().to(torch.float32).contiguous().clone()  # [L] .. [L, f]
                   for i, s in enumerate(each) for f, t in s.tensors().items()}
        data = save(tensors, metadata={"key": key_text, "checksum": _checksum(tensors, key_text)})
        try:
            save_bytes(data, path)
        except OSError as e:
            warnings.warn(f"attribution cache: could not write {path}: {e}")
