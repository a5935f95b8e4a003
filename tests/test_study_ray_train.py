"""The study's LoRA arms as Ray Train runs (laten_ray/study/ray_train.py) on a local Ray cluster
started here: one worker, SIGKILLed mid-run and restarted by Ray Train, gives the model of the
plain loop bit for bit; two CPU workers (gloo) train data-parallel to it within float rounding
and the study completes with them; each run keeps a Checkpoint per budget in the unit's folder
and is listed in Ray Train's state (the API a Train dashboard reads)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from helpers import free_port
from laten_ray.study.config import study_from_dict
from test_study import tiny_study_dict

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]

BUDGETS = [2, 24]  # steps after the budget of 2 to kill a worker in (at step 3)


@pytest.fixture(scope="module")
def dashboard(laten_cache):
    """Ray in this process (2 CPUs, the dashboard on 127.0.0.1 without a token); its URL."""
    import ray

    from laten_ray import entry
    entry.set_process_defaults()
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # Ray Train's state API read without a token
        ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            ray.shutdown()


def study_dict(root: Path, workers: int, **extra) -> dict:
    laten = tiny_study_dict(root)["laten"]
    return tiny_study_dict(root, budgets=BUDGETS, ray={"train_workers": workers},
                           laten={**laten, "train": {**laten["train"], "steps": None, "warmup_steps": 1}}, **extra)


def study(root: Path, workers: int, **extra):
    return study_from_dict(study_dict(root, workers, **extra))


def on_ray(msg):
    """Build a unit in a Ray task of one CPU, as the study does."""
    import ray

    from laten_ray import entry
    from laten_ray.study.units import build_unit
    task = ray.remote(build_unit).options(num_cpus=1, runtime_env={"env_vars": entry.worker_env(1)})
    return ray.get(task.remote(msg))


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


def losses(folder: Path) -> list[float]:
    return [json.loads(line)["lm_loss"] for line in (folder / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, dashboard):
    """sft-lora as before Ray Train (train_workers 0: the loop in this process)."""
    from laten_ray.study.arms import ARMS
    out = tmp_path_factory.mktemp("plain")
    ARMS["sft-lora"].build(study(out, 0), 0, out / "unit", {})
    return out / "unit"


def train_runs(dashboard: str) -> dict:
    """Ray Train's runs (its state API), by name."""
    with urllib.request.urlopen(f"{dashboard}/api/train/v2/runs/v1", timeout=30) as r:
        return {t["name"]: t for t in json.loads(r.read())["train_runs"]}


def kill_the_worker_after_step_3(folder: Path, killed: list) -> None:
    """SIGKILL the run's worker once 3 steps are on disk: its pid is found while it loads the
    model, so the kill itself is a file check and a signal."""
    metrics, since, deadline = folder / "sft" / "metrics.jsonl", time.time() - 1, time.monotonic() + 600
    pid = None
    while pid is None and time.monotonic() < deadline:
        pid = process_titled("ray::RayTrainWorker", since, [])
        time.sleep(0.02)
    while pid is not None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, len(metrics.read_text().splitlines())))
            return
        time.sleep(0.002)


def train_run(dashboard: str, name: str, attempts: int) -> dict:
    """The run in Ray Train's state once it is FINISHED with `attempts` attempts (its state actor
    catches up with the run later under load: up to a minute)."""
    deadline = time.monotonic() + 60
    while True:
        run = train_runs(dashboard).get(name, {})
        if (run.get("status") == "FINISHED" and len(run.get("attempts") or []) == attempts) \
                or time.monotonic() > deadline:
            return run
        time.sleep(0.5)


def test_one_worker_killed_and_restarted_trains_the_plain_loops_model(tmp_path, dashboard, plain):
    from laten_ray.lora import STATE
    from laten_ray.study.ray_train import run_name
    from laten_ray.study.units import BuildUnit
    s = study(tmp_path, 1)
    folder = tmp_path / "arms" / "sft-lora-s0-0123456789"
    name = run_name(s, folder)
    assert name == "laten-study-t-sft-lora-s0-0123456789"  # the study, arm, seed and hash
    killed: list = []
    threading.Thread(target=kill_the_worker_after_step_3, args=(folder, killed), daemon=True).start()
    info = on_ray(BuildUnit(s, "sft-lora", 0, str(folder), {}, "h", 1))
    assert info["ray_train"] == {**info["ray_train"], "name": name, "workers": 1}
    assert killed and killed[0][1] < BUDGETS[-1], "the worker was not killed mid-run"
    run = train_run(dashboard, name, attempts=2)
    assert run["status"] == "FINISHED" and len(run["attempts"]) == 2  # Ray Train's state shows the restart

    # the tolerance is equality: the same loop, seed and threads on CPU (float32), resumed exactly
    assert losses(folder) == losses(plain)
    for b in BUDGETS:
        ours, theirs = weights(folder / f"model-{b}"), weights(plain / f"model-{b}")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Ray Train's Checkpoint of each budget is the step state of that step, in the unit's folder
    for b in BUDGETS:
        state = torch.load(folder / "ray-train" / name / f"step-{b}" / STATE, weights_only=False)
        assert len(state["history"]) == b


def kill_the_first_evaluator_twice(killed: list) -> None:
    """SIGKILL the first evaluator process, then its restart (Ray restarts an evaluator once):
    the study must run that evaluation again on a fresh evaluator."""
    since, deadline = time.time() - 1, time.monotonic() + 300
    while len(killed) < 2 and time.monotonic() < deadline:
        pid = process_titled("ray::EvaluatorActor", since, killed)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.02)


def process_titled(title: str, since: float, but: list):
    """The pid of a process started after `since` whose title (Ray sets it) begins with `title`,
    other than those in `but`; or None."""
    import psutil
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if p.info["create_time"] >= since and cmd and cmd[0].startswith(title) and p.pid not in but:
            return p.pid
    return None


def test_two_cpu_workers_train_data_parallel_and_the_study_completes(tmp_path, dashboard, plain):
    """The tolerance: two workers sum the gradients, token counts and losses in another order
    than one process (float32): weights within 1e-6 (at most 9e-8 measured over 40 steps),
    losses within 1e-6 relative. The study runs as users run it, `python -m jobs.study
    --address` in a process of its own joining the cluster; meanwhile the target's evaluator is
    killed for good (twice): the study evaluates it again on a fresh one."""
    import ray
    config = study_dict(tmp_path, 2, arms=["target", "sft-lora"], seeds=[0], engine="hf",
                        task={**tiny_study_dict(tmp_path)["task"], "limit": 4})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    killed: list = []
    threading.Thread(target=kill_the_first_evaluator_twice, args=(killed,), daemon=True).start()
    done = subprocess.run([sys.executable, "-m", "jobs.study", "--config", str(tmp_path / "study.yaml"), "--address",
                           ray.get_runtime_context().gcs_address], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, "\n".join(lines[-60:])
    folder = study_from_dict(config).study_dir
    assert len(killed) == 2, killed
    assert any("target: its evaluator was lost" in line and "evaluating again" in line for line in lines), lines
    plan = json.loads((folder / "plan.json").read_text())
    unit = folder / next(u["folder"] for u in plan["units"] if u["arm"] == "sft-lora")
    built = json.loads((unit / "built.json").read_text())
    assert built["ray_train"]["workers"] == 2
    assert losses(unit) == pytest.approx(losses(plain), rel=1e-6)
    for b in BUDGETS:
        ours, theirs = weights(unit / f"model-{b}"), weights(plain / f"model-{b}")
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= 1e-6, diff
    results = json.loads((folder / "results.json").read_text())
    assert [(a["arm"], a["budget"]) for a in results["arms"]] == [("target", None)] + [("sft-lora", b) for b in BUDGETS]
    assert (folder / "report.md").is_file()
