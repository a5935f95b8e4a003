"""The target actor (`laten-target`): the frozen target, the hypernetwork and its optimizer."""
from __future__ import annotations

import time

from laten_ray.train import TargetTraining, prepare_run_dir

from .common import actor_config, place_on_assigned_gpu, process_info
from .metrics import RunMetrics


class TargetActor:
    """Steps on the source's slices and checkpoints after every step. A restarted actor
    resumes from the run folder's last checkpoint, as `laten train` does."""
    name = "laten-target"

    def __init__(self, cfg: dict, d_source: int, num_cpus: float = 1.0):
        self.cfg = actor_config(cfg, num_cpus)
        # The driver checked the run folder too; on a cluster this node may see another disk.
        prepare_run_dir(self.cfg)
        place_on_assigned_gpu(self.cfg, "target")
        self.side = TargetTraining(self.cfg, d_source, self.cfg.run_dir)
        self.done = self.side.resume()
        self.metrics = RunMetrics(self.cfg.name)
        self.idle_since = time.perf_counter()

    def flush(self) -> int:
        """Wait until the last checkpoint is on disk; return the steps it holds."""
        self.side.wait_for_checkpoint()
        return self.done

    def info(self) -> dict:
        return {**process_info(), "done": self.done, "total": self.side.total}

    def step(self, step: int, sent: dict, in_flight: int = 0) -> dict:
        """Train step `step` on the source's output for it (Ray resolves the ObjectRef before
        this runs, so the time since the last step ended is time spent waiting for slices)."""
        wait = time.perf_counter() - self.idle_since
        if step < self.done:  # sent again after a recovery: already in the checkpoint
            return self.side.history[step]
        if step != self.done or sent["step"] != step:
            raise RuntimeError(f"the target expected step {self.done}, got {step} "
                               f"(slices of step {sent['step']})")
        metrics = self.side.step(step, sent["located"])
        metrics["source_attribution_s"] = sent["attribution_s"]
        metrics["slice_wait_s"] = wait
        t0 = time.perf_counter()  # the write itself overlaps the next step
        self.side.save_checkpoint(step + 1, background=True)
        metrics["checkpoint_s"] = time.perf_counter() - t0
        self.done = step + 1
        self.metrics.target_step(metrics, in_flight)
        self.idle_since = time.perf_counter()
        return metrics
