"""What both training actors do on start: threads, device and config inside a Ray worker."""
from __future__ import annotations

import os
import warnings

import ray
import torch

from laten_ray.config import Config, config_from_dict


def actor_config(cfg: dict, num_cpus: float) -> Config:
    """The run's config as this actor sees it, validated again on this node (paths must exist
    here too); torch gets as many threads as the actor has CPUs."""
    torch.set_num_threads(max(1, int(num_cpus)))
    # Slices are read-only, contiguous and detached: zero-copy through the object store is safe
    # for them, and the trainer never writes to the read-only buffers it receives.
    from ray._private.tensor_serialization_utils import ZeroCopyTensorsWarning
    warnings.filterwarnings("ignore", category=ZeroCopyTensorsWarning)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    return config_from_dict(cfg)


def place_on_assigned_gpu(config: Config, role: str) -> None:
    """Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so `cuda:1` of the config is
    `cuda:0` in here."""
    spec = getattr(config, role)
    if spec.device.startswith("cuda") and ray.get_gpu_ids():
        spec.device = "cuda:0"


def process_info() -> dict:
    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()]}
