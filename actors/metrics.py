"""The run's custom metrics (ray.util.metrics). Ray exports them on every node's metrics port,
where Prometheus scrapes them and the dashboard's Metrics page reads them, prefixed `ray_`."""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge


class RunMetrics:
    """Created inside an actor; every series carries the run's name as tag `run`."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        keys = ("run",)
        self.step = Gauge("laten_step", "optimizer steps done", tag_keys=keys)
        self.steps_total = Gauge("laten_steps_total", "optimizer steps of the run", tag_keys=keys)
        self.lm_loss = Gauge("laten_lm_loss", "LM loss of the last step", tag_keys=keys)
        self.reg_loss = Gauge("laten_reg_loss", "regularizer loss of the last step", tag_keys=keys)
        self.step_seconds = Gauge("laten_step_seconds", "the target's seconds for the last step", tag_keys=keys)
        self.wait_seconds = Gauge("laten_slice_wait_seconds",
                                  "seconds the target waited for the last step's slices", tag_keys=keys)
        self.in_flight = Gauge("laten_examples_in_flight",
                               "extract examples asked of the source and not yet trained on",
                               tag_keys=keys)
        self.attribution_seconds = Counter("laten_attribution_seconds",
                                           "seconds spent in attribution, per role",
                                           tag_keys=("run", "role"))
        self.slice_bytes = Counter("laten_slice_bytes", "bytes of knowledge slices sent by the source",
                                   tag_keys=keys)

    def source_sent(self, nbytes: int, attribution_s: float) -> None:
        self.slice_bytes.inc(nbytes, self.tags)
        if attribution_s > 0:
            self.attribution_seconds.inc(attribution_s, {**self.tags, "role": "source"})

    def target_step(self, m: dict, in_flight: int) -> None:
        self.step.set(m["step"], self.tags)
        self.steps_total.set(m["steps"], self.tags)
        self.lm_loss.set(m["lm_loss"], self.tags)
        self.reg_loss.set(m["reg_loss"], self.tags)
        self.step_seconds.set(m["step_s"], self.tags)
        self.wait_seconds.set(m["slice_wait_s"], self.tags)
        self.in_flight.set(in_flight, self.tags)
        if m["target_attribution_s"] > 0:
            self.attribution_seconds.inc(m["target_attribution_s"], {**self.tags, "role": "target"})
