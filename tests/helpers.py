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


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_laten_serve(args: list[str], log_path):
    """`laten serve ARGS` in its own process group with a local Ray of its own (127.0.0.1 only),
    its output in `log_path`."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "jobs.cli", "serve", "--address", "local", *args], cwd=repo,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc, first=None) -> None:
    """Signal a process started in its own session (`first`, default SIGTERM), SIGKILL its
    group after a minute."""
    import os
    import signal
    import subprocess
    if proc.poll() is None:
        os.killpg(proc.pid, first or signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def stop_laten_serve(proc) -> None:
    """SIGTERM to the server's group (SIGKILL after a minute), then stop what is left of Ray."""
    import subprocess
    import sys
    from pathlib import Path
    stop_group(proc)
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=120)


def debian_tool(binary: str, package: str) -> str:
    """The path of `binary`: on PATH, or installed from Debian's `package` when this runs as root
    where apt-get exists (`bash scripts/install.sh test` installs it the same way); else the
    test is skipped, saying why."""
    import os
    import shutil
    import subprocess

    import pytest
    if found := shutil.which(binary):
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"{binary} is not on PATH and cannot be installed here (Debian's `apt-get install {package}` "
                    "needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", package]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if not (found := shutil.which(binary)):
        pytest.skip(f"`apt-get install {package}` did not install {binary}: {done.stderr.strip()[-500:]}")
    return found
