"""Training on a real local Ray cluster (127.0.0.1, started and stopped here): `ray job submit`,
`laten train --ray`, metrics on the node's Prometheus endpoint, SIGKILL recovery, fast failure."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from helpers import tiny_config_dict
from laten_ray.checkpoint import checkpoint_steps, load_checkpoint
from laten_ray.checks import load_checked
from laten_ray.train import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
JOB_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, laten_cache):
    """A one-node Ray cluster on 127.0.0.1 with token authentication, as `ray start --head` makes it."""
    tmp = tmp_path_factory.mktemp("ray")
    token = tmp / "auth_token"
    token.write_text(os.urandom(16).hex())
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    ports = {"gcs": free_port(), "dashboard": free_port(), "metrics": free_port()}
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    start = subprocess.run(
        [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(ports["gcs"]),
         "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(ports["dashboard"]),
         "--metrics-export-port", str(ports["metrics"]), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"env": env, "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
               "gcs": f"127.0.0.1:{ports['gcs']}", "metrics": f"http://127.0.0.1:{ports['metrics']}/metrics"}
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def write_config(path: Path, run_root: Path, name: str, **train_kw) -> Path:
    tree = tiny_config_dict("llama", run_root, **train_kw)
    tree["name"] = name
    path.write_text(yaml.safe_dump(tree))
    return path


def hypernet_of(run_dir: Path) -> dict:
    return load_checkpoint(run_dir, checkpoint_steps(run_dir)[-1])["hypernet"]


def single_process(config: Path, run_root: Path, *overrides: str) -> Path:
    return train(load_checked(config, [f"output_dir={run_root}", *overrides]))


def submit(cluster, *args: str, wait: bool = True, timeout: float = JOB_TIMEOUT_S):
    """`ray job submit` exactly as a user types it, from the repository root."""
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".",
           "--runtime-env", "runtime_env.yaml", *([] if wait else ["--no-wait"]),
           "--", "python", "-m", "jobs.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True,
                          timeout=timeout)


def scrape(cluster) -> str:
    with urllib.request.urlopen(cluster["metrics"], timeout=10) as r:
        return r.read().decode()


def metric(text: str, name: str, run: str, **tags) -> float | None:
    """The value of `ray_<name>` for this run (and tags), summed over the workers that report it."""
    values = []
    for line in text.splitlines():
        if line.startswith(f"ray_{name}{{") and f'run="{run}"' in line and \
                all(f'{k}="{v}"' in line for k, v in tags.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return sum(values) if values else None


def test_job_submit_equals_single_process_and_exports_metrics(cluster, tmp_path):
    config = write_config(tmp_path / "job.yaml", tmp_path / "unused", "jobrun", steps=4)
    reference = single_process(config, tmp_path / "single")

    run_root = tmp_path / "ray"
    done = submit(cluster, "--config", str(config), f"output_dir={run_root}")
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert f"done: {run_root / 'jobrun'}" in log
    assert re.search(r"step 4/4  lm_loss \d", log)  # a progress line per step
    assert checkpoint_steps(run_root / "jobrun") == [1, 2, 3, 4]
    torch.testing.assert_close(hypernet_of(run_root / "jobrun"), hypernet_of(reference), atol=1e-5, rtol=0)

    # The custom metrics on the node's Prometheus endpoint (exported every few seconds).
    history = load_checkpoint(run_root / "jobrun", 4)["history"]
    deadline = time.monotonic() + 90
    while True:
        text = scrape(cluster)
        if metric(text, "laten_step", "jobrun") == 4 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert metric(text, "laten_step", "jobrun") == 4
    assert metric(text, "laten_lm_loss", "jobrun") == pytest.approx(history[-1]["lm_loss"], rel=1e-6)
    assert metric(text, "laten_reg_loss", "jobrun") == pytest.approx(history[-1]["reg_loss"], rel=1e-6)
    assert metric(text, "laten_slice_bytes_total", "jobrun") == sum(m["slice_bytes"] for m in history)
    assert metric(text, "laten_attribution_seconds_total", "jobrun", role="source") > 0
    assert metric(text, "laten_attribution_seconds_total", "jobrun", role="target") > 0
    assert metric(text, "laten_step_seconds", "jobrun") > 0
    assert metric(text, "laten_examples_in_flight", "jobrun") is not None
    assert metric(text, "laten_slice_wait_seconds", "jobrun") is not None


def test_job_submit_of_a_paper_config_reads_the_uploaded_data(cluster, tmp_path):
    """configs/gsm.yaml names data/gsm/...: inside the job's copy of the working directory
    those are the uploaded files, and the run equals the single-process one."""
    overrides = ["source.model=tiny:llama-source", "target.model=tiny:llama-target", "source.device=cpu",
                 "target.device=cpu", "source.dtype=float32", "target.dtype=float32", "train.steps=2",
                 "attribution.batch_size=2", "train.align_per_step=3", "data.max_length=256"]
    config = REPO / "configs" / "gsm.yaml"
    reference = single_process(config, tmp_path / "single", *overrides)
    run_root = tmp_path / "ray"
    done = submit(cluster, "--config", "configs/gsm.yaml", *overrides, f"output_dir={run_root}")
    assert done.returncode == 0, done.stdout + done.stderr
    run = run_root / "gsm-llama2-13b-7b"
    assert checkpoint_steps(run) == [1, 2]
    torch.testing.assert_close(hypernet_of(run), hypernet_of(reference), atol=1e-5, rtol=0)


def test_laten_train_ray_direct_transport_strict_alternation(cluster, tmp_path):
    """`laten train --ray` on the same cluster, slices over Ray's direct (gloo) transport, no
    look-ahead, and attribution groups that straddle look-ahead windows: still the same result."""
    config = write_config(tmp_path / "cli.yaml", tmp_path / "unused", "clirun", steps=5)
    overrides = ["attribution.batch_size=2"]
    reference = single_process(config, tmp_path / "single", *overrides)
    run_root = tmp_path / "ray"
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "train", "--ray", "--address", cluster["gcs"],
         "--config", str(config), f"output_dir={run_root}", *overrides,
         "ray.transport=gloo", "ray.lookahead=0"],
        cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    torch.testing.assert_close(hypernet_of(run_root / "clirun"), hypernet_of(reference), atol=1e-5, rtol=0)


def actor_pid(cluster, name: str) -> int:
    """The process of the named actor, from the cluster's state API (`ray list actors`)."""
    out = subprocess.run([RAY, "list", "actors", "--address", cluster["dashboard"], "--format", "json",
                          "--filter", f"name={name}", "--filter", "state=ALIVE"],
                         env=cluster["env"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    alive = json.loads(out.stdout)
    assert len(alive) == 1, alive
    return int(alive[0]["pid"])


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A config with enough steps to kill an actor mid-run, and its uninterrupted result."""
    tmp = tmp_path_factory.mktemp("long")
    config = write_config(tmp / "long.yaml", tmp / "unused", "longrun", steps=40,
                          align_per_step=8)
    return config, hypernet_of(single_process(config, tmp / "single"))


@pytest.mark.parametrize("victim", ["laten-target", "laten-source"])
def test_sigkill_mid_run_recovers_to_the_uninterrupted_result(cluster, long_run, tmp_path, victim):
    config, reference = long_run
    run_dir = tmp_path / "ray" / "longrun"
    job = subprocess.Popen(
        [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".",
         "--runtime-env", "runtime_env.yaml", "--", "python", "-m", "jobs.train",
         "--config", str(config), f"output_dir={tmp_path / 'ray'}"],
        cwd=REPO, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not (run_dir.is_dir() and len(checkpoint_steps(run_dir)) >= 3):
            assert job.poll() is None and time.monotonic() < deadline, "job ended before the kill"
            time.sleep(0.02)
        os.kill(actor_pid(cluster, victim), signal.SIGKILL)
        killed_at = checkpoint_steps(run_dir)[-1]
        log, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
    print(log)  # shown by pytest -rP: the job's own account of the failure and the resume
    assert job.returncode == 0, log
    assert killed_at < 40, "the kill came after the last step"
    assert "an actor failed" in log and f"{victim} was restarted" in log and "resuming at step" in log, log
    assert checkpoint_steps(run_dir)[-1] == 40
    torch.testing.assert_close(hypernet_of(run_dir), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("source.model=/nope/model", "source.model: model folder '/nope/model' not found (no config.json there)"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"),
])  # each value is given on the command line: the error names that override as its origin
def test_bad_config_fails_the_job_fast_with_the_message(cluster, tmp_path, override, message):
    config = write_config(tmp_path / "bad.yaml", tmp_path / "runs", "badrun")
    t0 = time.monotonic()
    done = submit(cluster, "--config", str(config), override, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"laten: error: override {override!r}: {message}" in log, log
    assert "SourceActor" not in log and "run folder" not in log  # no actor was started
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "runs").exists()


def test_evaluate_and_serve_as_ray_jobs(cluster, tmp_path):
    """`ray job submit` of jobs.evaluate (an evaluator actor) and of jobs.serve --detach (a Serve
    app that outlives its job) on the same cluster."""
    import json as json_
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json_.dumps({"id": i, "question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(4)))
    out = tmp_path / "eval"
    cmd = [RAY, "job", "submit", "--address", cluster["dashboard"], "--working-dir", ".", "--runtime-env",
           "runtime_env.yaml", "--", "python", "-m"]
    done = subprocess.run([*cmd, "jobs.evaluate", "--model", "tiny:llama-source", "--task", "gsm8k", "--data",
                           str(data), "--out", str(out), "--engine", "hf", "--max-tokens", "8"],
                          cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["examples"] == 4
    assert "gsm8k: accuracy" in done.stdout

    port = free_port()
    done = subprocess.run([*cmd, "jobs.serve", "--model", "tiny:llama-source", "--name", "tiny", "--engine", "hf",
                           "--port", str(port), "--detach"],
                          cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "tiny", "prompt": "1 + 1 =", "max_tokens": 4, "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=60) as r:  # the job has ended; the app serves on
            assert r.status == 200 and json.loads(r.read())["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        subprocess.run([str(Path(sys.executable).with_name("serve")), "shutdown", "--address", cluster["dashboard"], "-y"],
                       env=cluster["env"], capture_output=True, timeout=120)


# --- which cluster a command runs on ----------------------------------------------------------

def actor_names(cluster) -> list[str]:
    """Every actor the cluster has had (the dead ones too), by name."""
    done = subprocess.run([RAY, "list", "actors", "--address", cluster["dashboard"], "--format", "json",
                           "--limit", "10000"], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [a.get("name") or "" for a in json.loads(done.stdout)]


def laten_cli(*args: str, env: dict, timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_running_cluster_is_joined_only_when_asked(cluster, tmp_path):
    """With an unrelated cluster running (the fixture's, as `ray start --head` makes it), `laten train
    --ray` and `laten study` start a private cluster of their own and leave the other untouched;
    with --address (or $RAY_ADDRESS) they join it."""
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"}
    before = actor_names(cluster)
    config = write_config(tmp_path / "own.yaml", tmp_path / "runs", "ownrun", steps=2)
    done = laten_cli("train", "--ray", "--config", str(config), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"done: {tmp_path / 'runs' / 'ownrun'}" in done.stdout
    study = ["study", "--config", "configs/study-demo.yaml", f"output_dir={tmp_path / 'studies'}", "arms=[target]",
             "seeds=1", "task.limit=4"]
    done = laten_cli(*study, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on a private local Ray cluster (127.0.0.1:" in done.stdout
    assert actor_names(cluster) == before  # nothing ran there
    assert subprocess.run([RAY, "status", "--address", cluster["gcs"]], env=env, capture_output=True,
                          timeout=120).returncode == 0  # and it still runs

    done = laten_cli("train", "--ray", "--address", cluster["gcs"], "--config", str(config), "name=joined", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = laten_cli(*study, "name=joined", env={**env, "RAY_ADDRESS": cluster["gcs"]})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"on the Ray cluster at {cluster['gcs']}" in done.stdout
    joined = actor_names(cluster)
    assert {"laten-source", "laten-target"} <= set(joined) and len(joined) > len(before) + 2


def test_a_cluster_that_cannot_be_joined_is_one_line(tmp_path):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    config = write_config(tmp_path / "c.yaml", tmp_path / "runs", "nowhere", steps=1)
    done = laten_cli("train", "--ray", "--address", f"127.0.0.1:{free_port()}", "--config", str(config), env=env,
                     timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "laten: error: could not join the Ray cluster at 127.0.0.1:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
