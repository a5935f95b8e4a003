"""What both training actors do on start: threads, device and config inside a Ray worker."""
from __future__ import annotations

import os
import warnings

import ray
import torch

from laten_ray.checks import checked_from_dict
from laten_ray.config import Config
from laten_ray.entry import set_process_defaults


def actor_config(cfg: dict, num_cpus: float) -> Config:
    """The run's config as this actor sees it, checked again on this node (paths must exist
    here too); torch gets as many threads as the actor has CPUs."""
    torch.set_num_threads(max(1, int(num_cpus)))
    set_process_defaults()
    # Slices are read-only, contiguous and detached: zero-copy through the object store is safe
    # for them. (After Ray's import, which installs its own filter for this category.)
    from ray._private.tensor_serialization_utils import ZeroCopyTensorsWarning
    warnings.filterwarnings("ignore", category=ZeroCopyTensorsWarning)
    return checked_from_dict(cfg)


def place_on_assigned_gpu(config: Config, role: str) -> None:
    """Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned, so `cuda:1` of the config is
    `cuda:0` in here."""
    spec = getattr(config, role)
    if spec.device.startswith("cuda") and ray.get_gpu_ids():
        spec.device = "cuda:0"


def process_info() -> dict:
    return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
            "gpus": [str(g) for g in ray.get_gpu_ids()]}
