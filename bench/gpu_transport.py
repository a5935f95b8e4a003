"""GPU check of the Ray training path: the same tiny job single-process on the GPU, then on Ray
with slices through the object store and through Ray's direct transport (`cuda_ipc` when both
actors share one GPU, `nccl` when there are two GPUs), side by side in one run. Prints the
largest hypernetwork difference to the single-process result and the seconds of each run.

    python bench/gpu_transport.py [--steps 6] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_transport.py needs a CUDA GPU")
    import ray

    from jobs.train import train_on_ray
    from laten_ray.checkpoint import checkpoint_steps, load_checkpoint
    from laten_ray.checks import checked_from_dict
    from laten_ray.train import train

    n_gpus = torch.cuda.device_count()
    direct = "nccl" if n_gpus >= 2 else "cuda_ipc"
    share = 1.0 if n_gpus >= 2 else 0.5
    root = Path(tempfile.mkdtemp(prefix="laten-gpu-transport-"))

    def cfg(name: str, transport: str) -> dict:
        return {"name": name, "output_dir": str(root), "seed": 0,
                "source": {"model": "tiny:llama-source", "device": "cuda:0"},
                "target": {"model": "tiny:llama-target", "device": f"cuda:{1 if n_gpus >= 2 else 0}"},
                "data": {"align": "demo:align", "extract": "demo:extract", "max_length": 128},
                "transfer": {"rate": 0.25}, "hypernet": {"init_std": 0.02},
                "attribution": {"batch_size": 2},
                "train": {"steps": args.steps, "align_per_step": 7, "micro_batch_size": 8, "lr": 1e-3},
                "ray": {"transport": transport, "source": {"num_gpus": share}, "target": {"num_gpus": share}}}

    def hypernet(name: str) -> dict:
        run = root / name
        return load_checkpoint(run, checkpoint_steps(run)[-1])["hypernet"]

    report = {"gpus": [torch.cuda.get_device_name(i) for i in range(n_gpus)], "steps": args.steps}
    t0 = time.perf_counter()
    train(checked_from_dict(cfg("single", "object_store")))
    report["single_process_s"] = time.perf_counter() - t0
    reference = hypernet("single")
    ray.init(num_cpus=4, num_gpus=n_gpus, include_dashboard=False)
    for transport in ("object_store", direct):
        steps: list[dict] = []
        t0 = time.perf_counter()
        train_on_ray(checked_from_dict(cfg(transport, transport)), on_step=steps.append)
        got = hypernet(transport)
        report[transport] = {
            "job_s": time.perf_counter() - t0,
            "mean_step_wall_s": sum(m["wall_s"] for m in steps[1:]) / max(1, len(steps) - 1),
            "max_abs_diff_vs_single_process": max((got[k] - reference[k]).abs().max().item() for k in got)}
        print(transport, report[transport], flush=True)
    ray.shutdown()
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
