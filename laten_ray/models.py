"""Model specs and loading. A spec is an HF model folder or `tiny:NAME`, a built-in model
(laten_ray/builtin/tiny.py) built on first use."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .builtin import tiny
from .config import DTYPES
from .hints import nearby, run_folder_given

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


def check_spec(spec: str) -> None:
    """Raise a clear error for a spec that names neither a model folder nor a tiny preset."""
    if spec.startswith("tiny:"):
        if spec[5:] not in tiny.NAMES:
            names = ", ".join(f"tiny:{n}" for n in tiny.NAMES)
            raise ValueError(f"unknown tiny model {spec!r}; presets: {names}")
    elif not tiny.is_model_folder(spec):
        raise FileNotFoundError(run_folder_given(spec) or
                                f"model folder {spec!r} not found (no config.json there){nearby(spec)}")


def resolve(spec: str) -> Path:
    """The folder of a model spec, building a tiny preset on first use."""
    check_spec(spec)
    if spec.startswith("tiny:"):
        return tiny.tiny_folder(spec[5:])
    return Path(spec)


def read_model_config(spec: str):
    """The HF config of a spec, without loading or building any weights."""
    from transformers import AutoConfig
    check_spec(spec)
    if spec.startswith("tiny:"):
        return tiny.tiny_config(spec[5:])
    return AutoConfig.from_pretrained(spec)


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve(spec))


def load_model(spec: str, dtype: str = "float32", device: str = "cpu"):
    """A frozen model in eval mode."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=TORCH_DTYPES[dtype])
    model.to(device).eval().requires_grad_(False)
    return model


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def hardware() -> dict:
    """Where this process runs (a study's unit, in built.json): host, CPU, the CPUs it may use,
    its torch threads, GPUs."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"host": platform.node(), "cpu": cpu, "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpus": gpus}
