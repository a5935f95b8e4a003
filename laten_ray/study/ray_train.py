"""The LoRA arms' training (sft-lora, distill, Seeking's post-alignment) as a Ray Train run, on
the cluster the study's build task runs on: a TorchTrainer of `ray.train_workers` workers, each
running arms.lora_train (lora.finetune's one loop) on its part of every step. So the run is in
Ray Train's state (named laten-study-STUDY-ARM-sSEED-HASH; its actors on the dashboard's Actors
page), reports the loss of every
step with ray.train.report, and keeps a Checkpoint (the adapter, optimizer and schedule of
lora.finetune, lora_state.pt) at each budget through Ray Train, in the unit's own
`ray-train/` folder. The unit's outputs (a merged folder per budget, sft/metrics.jsonl) are
written by rank 0 as without Ray.

A killed worker is restarted by Ray Train (FailureConfig) and resumes from the step state that
lora.finetune keeps in sft/ after every step, as a rerun of the build does.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

RETRIES = 2  # a killed worker's run restarts this often, as a killed build task is retried (jobs/study.py)
POLL_S = 0.1  # Ray Train's controller polls its workers this often (bench/results/ray_train_cpu.txt)


def run_name(study, folder: Path) -> str:
    """The run's name in Ray Train's state and metrics: the study and the unit's folder (arm, seed, hash)."""
    return f"laten-study-{study.name}-{folder.name}"


def fit(train, job: dict) -> dict:
    """`train(**job)` (arms.lora_train) in each worker of a Ray Train run; returns what rank 0's
    returns, with "ray_train": the run's name, workers and seconds from the call to its end."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    study, folder = job["study"], Path(job["folder"])
    r = study.ray
    use_gpu = r.num_gpus > 0
    name = run_name(study, folder)
    # The controller takes one report per poll of its workers, every 2 s by default: 128 reports
    # of a demo run's 0.1 s steps would take minutes. A setting of the user's wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(POLL_S))
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _worker, train_loop_config={"train": train, "job": job, "threads": max(1, int(r.num_cpus)),
                                    "use_gpu": use_gpu},
        # each worker trains one copy of the target: the build's CPUs, and one GPU where builds have GPUs
        scaling_config=ScalingConfig(num_workers=r.train_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": r.num_cpus, **({"GPU": min(r.num_gpus, 1.0)}
                                                                                  if use_gpu else {})}),
        run_config=RunConfig(name=name, storage_path=str(folder / "ray-train"),
                             failure_config=FailureConfig(max_failures=RETRIES),
                             checkpoint_config=CheckpointConfig(num_to_keep=None),  # every budget's
                             # the build task's environment: where models, data and caches are
                             worker_runtime_env=ray.get_runtime_context().runtime_env or None))
    built = trainer.fit().return_value  # rank 0's
    built["ray_train"] = {"name": name, "workers": r.train_workers, "fit_s": time.perf_counter() - t0}
    return built


def _worker(config: dict) -> dict:
    """One Ray Train worker: lora_train on this worker's part of every step; rank 0 writes (and
    its return value is the run's)."""
    import ray.train
    import torch
    from transformers.utils import logging as hf_logging

    from ..lora import STATE, Shard
    from ..models import hardware
    hf_logging.disable_progress_bar()  # the environment's defaults came with the build task's runtime_env
    torch.set_num_threads(config["threads"])  # as the build task would: same threads, same sums
    job, ctx = dict(config["job"]), ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    if config["use_gpu"]:  # this worker's GPU, whatever device the config names
        import ray.train.torch
        cfg = job["cfg"]
        job["cfg"] = replace(cfg, target=replace(cfg.target, device=str(ray.train.torch.get_device())))
    study, folder = job["study"], Path(job["folder"])
    keep = {b for b in study.budget_list if b} | {len(job["steps"])}  # steps whose state is a Checkpoint

    def on_step(metrics: dict) -> None:
        """Every worker reports every step (each report syncs the workers); rank 0 adds the
        Checkpoint of a budget: a hard link to the step state lora.finetune has just written (it
        writes the next one to a new file), in the run's folder, so nothing is copied. ASYNC:
        training goes on while the controller collects the reports, one per poll."""
        checkpoint = None
        if rank == 0 and metrics["step"] in keep:
            kept = Path(ctx.get_storage().experiment_fs_path) / f"step-{metrics['step']}"
            kept.mkdir(parents=True, exist_ok=True)
            (kept / STATE).unlink(missing_ok=True)  # a restarted run's
            os.link(folder / "sft" / STATE, kept / STATE)
            checkpoint = ray.train.Checkpoint.from_directory(kept)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         checkpoint_upload_fn=_in_place, delete_local_checkpoint_after_upload=False)

    built = config["train"](**job, shard=Shard(rank, size) if size > 1 else None, on_step=on_step)
    return {**built, "hardware": hardware()}  # where it trained, not the waiting build task


def _in_place(checkpoint, dir_name: str):
    """The upload of a Checkpoint already in the run's folder: none."""
    return checkpoint
