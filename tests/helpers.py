"""What several test files share: the model families under test and a tiny run's config."""
from __future__ import annotations

FAMILIES = ["llama", "qwen2"]  # llama: multi-head attention; qwen2: grouped-query, head_dim != d/heads


def tiny_config_dict(family: str, run_root, **train) -> dict:
    """A complete training config for the family's tiny source/target pair, as plain data."""
    return {
        "name": f"{family}-run", "output_dir": str(run_root), "seed": 0,
        "source": {"model": f"tiny:{family}-source", "device": "cpu"},
        "target": {"model": f"tiny:{family}-target", "device": "cpu"},
        "data": {"align": "demo:align", "extract": "demo:extract", "max_length": 128},
        "transfer": {"rate": 0.25},
        "hypernet": {"init_std": 0.02},
        "train": {"steps": 3, "align_per_step": 5, "micro_batch_size": 3, "lr": 1e-3, **train},
    }
