"""The analyzer actor (`laten-analyzer`): one model of the pair for `laten analyze --ray`. Its
activations never leave it: it returns U-centred Grams, attribution summaries and weight-delta
cosines (laten_ray/analysis/side.py)."""
from __future__ import annotations


class AnalyzerActor:
    name = "laten-analyzer"

    def __init__(self, spec: str, dtype: str, device: str, num_cpus: float):
        import warnings

        import ray
        import torch

        from laten_ray.analysis.side import Side
        from laten_ray.entry import set_process_defaults
        set_process_defaults()
        # The Grams it returns are contiguous, detached and never written to after: safe zero-copy.
        from ray._private.tensor_serialization_utils import ZeroCopyTensorsWarning
        warnings.filterwarnings("ignore", category=ZeroCopyTensorsWarning)
        torch.set_num_threads(max(1, int(num_cpus)))
        if device.startswith("cuda") and ray.get_gpu_ids():
            device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigned
        self.side = Side(spec, dtype, device)

    def shape(self):
        return self.side.shape

    def grams(self, examples, max_length: int, gram_tokens: int) -> dict:
        return self.side.grams(examples, max_length, gram_tokens)

    def neurons(self, examples, counts: dict, batch_size: int, chunk_mb: int) -> dict:
        return self.side.neurons(examples, counts, batch_size, chunk_mb)

    def deltas(self, folder: str) -> dict:
        return self.side.deltas(folder)
