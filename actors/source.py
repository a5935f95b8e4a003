"""The source actor (`laten-source`): the source model, a few extract examples ahead of the target."""
from __future__ import annotations

from laten_ray.arch import shape_of
from laten_ray.data import read_examples
from laten_ray.locate import Source, neuron_counts
from laten_ray.models import read_model_config
from laten_ray.train import source_group

from .common import actor_config, place_on_assigned_gpu, process_info
from .metrics import RunMetrics

# Tensors that stay on the source's device for these transports; the others take CPU tensors.
DEVICE_TRANSPORTS = ("nccl", "cuda_ipc", "nixl")


class SourceActor:
    """Attribution, layer alignment and slice extraction for one training step at a time.

    Extract examples are attributed in the same fixed groups as the single-process run (`source_group`), so
    both select exactly the same neurons; the rest of a group waits here until asked for."""
    name = "laten-source"

    def __init__(self, cfg: dict, num_cpus: float = 1.0):
        self.cfg = actor_config(cfg, num_cpus)
        place_on_assigned_gpu(self.cfg, "source")
        self.source = Source(self.cfg)
        self.extract = read_examples(self.cfg.data.extract)
        self.target = shape_of(read_model_config(self.cfg.target.model))
        self.counts = neuron_counts(self.target, self.cfg.transfer.rate, self.cfg.transfer.modules)
        self.on_cpu = self.cfg.ray.transport not in DEVICE_TRANSPORTS
        self.ready: dict = {}  # extract index -> Located, the rest of the last group
        self.metrics = RunMetrics(self.cfg.name)

    def info(self) -> dict:
        return {**process_info(), "d_source": self.source.arch.shape.hidden}

    def locate(self, step: int) -> dict:
        """{"step", "located": Located with slices {module: [L_t, K, d_s]}, "attribution_s"}."""
        n = len(self.extract)
        if step % n not in self.ready:  # fixed groups of extract examples, whatever the step
            self.ready = source_group(self.source, self.extract, step % n, self.cfg.attribution.batch_size,
                                      self.target, self.counts, on_cpu=self.on_cpu)
        located = self.ready.pop(step % n)
        # One device for every tensor, as the transport needs it; contiguous for zero-copy.
        device = self.source.model.device if not self.on_cpu else "cpu"
        for field in ("layers", "index", "slices"):
            setattr(located, field, {m: t.to(device).contiguous() for m, t in getattr(located, field).items()})
        seconds = self.source.take_seconds()
        self.metrics.source_sent(located.nbytes(), seconds)
        return {"step": step, "located": located, "attribution_s": seconds}
