"""The checked-in Ray files: the cluster launcher config passes Ray's own schema, and the
runtime environment is what `ray job submit --runtime-env` accepts."""
from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_the_launcher_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)
    workers = config["available_node_types"]["gpu"]
    assert workers["min_workers"] == 2 and workers["resources"]["GPU"] == 1
    assert any("pip install" in c and "laten-ray" in c for c in config["setup_commands"])


def test_runtime_env_yaml_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv
    env = yaml.safe_load((REPO / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields or bad values
    assert env["working_dir"] == "."
    assert {".git", ".venv", "runs"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] == "1"
