"""Training: checkpoints every step, exact resume after a crash, micro-batching, run-folder checks."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from laten_ray import checkpoint as ckpt
from laten_ray.config import ConfigError, config_from_dict, load_config
from laten_ray.train import align_sample, one_cycle, train

from helpers import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]


def final_state(run_dir):
    return ckpt.load_checkpoint(run_dir)


def assert_same_hypernet(a, b):
    assert a["step"] == b["step"]
    for k, v in a["hypernet"].items():
        assert torch.equal(v, b["hypernet"][k]), k
    assert [m["lm_loss"] for m in a["history"]] == [m["lm_loss"] for m in b["history"]]


class Crash(Exception):
    pass


def test_train_writes_a_checkpoint_per_step_and_learns(tmp_path):
    cfg = config_from_dict(tiny_config_dict("qwen2", tmp_path, steps=3))
    run_dir = train(cfg)
    assert ckpt.checkpoint_steps(run_dir) == [1, 2, 3]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first, last = ckpt.load_checkpoint(run_dir, 1), ckpt.load_checkpoint(run_dir, 3)
    moved = [not torch.equal(first["hypernet"][k], last["hypernet"][k]) for k in first["hypernet"]]
    assert all(moved)  # every module's MLP was trained
    assert set(first["optimizer"]["state"])  # optimizer state is in the checkpoint


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, family):
    whole = train(config_from_dict(tiny_config_dict(family, tmp_path / "a", steps=4)))
    cfg = config_from_dict(tiny_config_dict(family, tmp_path / "b", steps=4))

    def crash_after_two(metrics):
        if metrics["step"] == 2:
            raise Crash
    with pytest.raises(Crash):
        train(cfg, on_step=crash_after_two)
    assert ckpt.checkpoint_steps(cfg.run_dir) == [1, 2]
    resumed = train(cfg)
    assert_same_hypernet(final_state(whole), final_state(resumed))
    a, b = final_state(whole), final_state(resumed)
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])


@pytest.mark.slow  # over 10 s on 2 cores
def test_sigkill_mid_run_then_rerun_equals_uninterrupted(tmp_path):
    """A real crash: the CLI process is killed with SIGKILL once its first checkpoint exists."""
    overrides = [f"output_dir={tmp_path}", "train.steps=12", "source.model=tiny:llama-source",
                 "target.model=tiny:llama-target", "train.align_per_step=15"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--config", "configs/tiny.yaml"]
    run_dir = tmp_path / "tiny"
    proc = subprocess.Popen(cmd + overrides, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.checkpoint_steps(run_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = ckpt.checkpoint_steps(run_dir)
    assert done_at_kill and done_at_kill[-1] < 12, done_at_kill  # killed mid-run
    subprocess.run(cmd + overrides, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    whole = load_config(REPO / "configs" / "tiny.yaml", overrides + [f"output_dir={tmp_path / 'whole'}"])
    assert_same_hypernet(final_state(train(whole)), final_state(run_dir))


def test_micro_batches_do_not_change_the_step(tmp_path):
    one = train(config_from_dict(tiny_config_dict("llama", tmp_path / "one", steps=2, micro_batch_size=6)))
    many = train(config_from_dict(tiny_config_dict("llama", tmp_path / "many", steps=2, micro_batch_size=1)))
    a, b = final_state(one), final_state(many)
    for k, v in a["hypernet"].items():
        torch.testing.assert_close(v, b["hypernet"][k], atol=1e-6, rtol=1.3e-6, msg=lambda m: f"{k}: {m}")
    assert a["history"][0]["lm_loss"] == pytest.approx(b["history"][0]["lm_loss"], rel=1e-5)


def test_run_folder_with_another_config_is_refused(tmp_path):
    train(config_from_dict(tiny_config_dict("llama", tmp_path, steps=1)))
    with pytest.raises(ConfigError, match="different config.*train"):
        train(config_from_dict(tiny_config_dict("llama", tmp_path, steps=1, lr=5e-4)))


def test_a_run_folder_is_the_same_run_however_its_paths_are_spelled(tmp_path, monkeypatch):
    """Relative or absolute, through a symlink, with its data file named another way (as a job's
    fresh copy of the working directory names it): the run resumes. Other data is refused."""
    import shutil
    from laten_ray.builtin.demo import write_split
    from laten_ray.train import prepare_run_dir
    monkeypatch.chdir(tmp_path)
    data = write_split("align", tmp_path / "copy-1")
    tree = tiny_config_dict("llama", "runs", steps=1)
    tree["data"]["align"] = "copy-1/demo_align.jsonl"
    train(config_from_dict(tree))  # relative paths, from the working directory
    (tmp_path / "link").symlink_to(tmp_path / "runs")
    (tmp_path / "copy-2").mkdir()
    shutil.copy(data, tmp_path / "copy-2" / "demo_align.jsonl")
    again = {**tree, "output_dir": str(tmp_path / "link"), "train": {**tree["train"], "steps": 2},
             "data": {**tree["data"], "align": str(tmp_path / "copy-2" / "demo_align.jsonl")}}
    with pytest.raises(ConfigError, match="differs in: train"):  # the step count is part of the run
        prepare_run_dir(config_from_dict(again))
    again["train"]["steps"] = 1
    run_dir = train(config_from_dict(again))
    assert ckpt.checkpoint_steps(run_dir) == [1] and run_dir.resolve() == (tmp_path / "runs" / "llama-run")
    (tmp_path / "copy-2" / "demo_align.jsonl").write_text(data.read_text().splitlines()[0] + "\n")
    with pytest.raises(ConfigError, match="differs in: data"):
        prepare_run_dir(config_from_dict(again))


def test_align_sample_depends_only_on_seed_and_step():
    assert align_sample(64, 15, 0, 3) == align_sample(64, 15, 0, 3)
    assert align_sample(64, 15, 0, 3) != align_sample(64, 15, 0, 4)
    assert len(set(align_sample(64, 15, 0, 3))) == 15


def test_one_cycle_rises_then_falls():
    f = one_cycle(10, 0.3)
    values = [f(i) for i in range(10)]
    peak = values.index(max(values))
    assert peak == 3 and values[0] < 0.1 and values[-1] < values[peak]
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))
    assert one_cycle(1, 0.3)(0) == pytest.approx(1.0)  # a single step runs at the full rate


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = train(config_from_dict(tiny_config_dict("qwen2", tmp_path / "plain", steps=2)))
    saved = train(config_from_dict(tiny_config_dict("qwen2", tmp_path / "ckpt", steps=2,
                                                    gradient_checkpointing=True)))
    a, b = final_state(plain), final_state(saved)
    for k, v in a["hypernet"].items():
        torch.testing.assert_close(v, b["hypernet"][k], atol=1e-6, rtol=1.3e-6, msg=lambda m: f"{k}: {m}")
    assert a["history"][-1]["lm_loss"] == pytest.approx(b["history"][-1]["lm_loss"], rel=1e-6)


def test_gradient_checkpointing_is_switched_on_in_the_target(tmp_path):
    from laten_ray.train import TargetTraining
    cfg = config_from_dict(tiny_config_dict("llama", tmp_path, gradient_checkpointing=True))
    side = TargetTraining(cfg, d_source=128)
    assert side.target.model.is_gradient_checkpointing and not side.target.model.training


def test_background_checkpoint_is_a_snapshot_and_its_errors_surface(tmp_path):
    from laten_ray.train import TargetTraining
    cfg = config_from_dict(tiny_config_dict("llama", tmp_path, steps=2))
    trainer = TargetTraining(cfg, d_source=128, run_dir=tmp_path / "run")
    hypernet = trainer.trainer.hypernet
    before = {k: v.clone() for k, v in hypernet.state_dict().items()}
    trainer.save_checkpoint(1, background=True)
    with torch.no_grad():  # training goes on while the checkpoint is written
        for p in hypernet.parameters():
            p.add_(1.0)
    trainer.wait_for_checkpoint()
    saved = ckpt.load_checkpoint(tmp_path / "run", 1)["hypernet"]
    assert all(torch.equal(saved[k], before[k]) for k in before)

    (tmp_path / "run" / "checkpoints").rename(tmp_path / "moved")
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder was")
    trainer.save_checkpoint(2, background=True)
    with pytest.raises(OSError):
        trainer.wait_for_checkpoint()
