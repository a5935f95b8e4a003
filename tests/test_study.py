"""`laten study`: its config checks, each control's defining property, LoRA's exact resume, and
the demo study end to end on a local Ray cluster (report files, a rerun that does nothing, and a
killed study that resumes to the same results)."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import FAMILIES
from jobs.cli import main as cli
from laten_ray.locate import Located
from laten_ray.study.arms import ARMS, noise_like, random_neurons
from laten_ray.study.config import study_from_dict

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "study-demo.yaml")


def tiny_study(root: Path, **extra) -> "StudyConfig":  # noqa: F821
    """A study of the random tiny Llama pair on the demo task, small enough for a unit test."""
    return study_from_dict(tiny_study_dict(root, **extra))


def tiny_study_dict(root: Path, **extra) -> dict:
    """tiny_study's config, as a study YAML would hold it."""
    return {
        "name": "t", "output_dir": str(root),
        "source": {"model": "tiny:llama-source", "device": "cpu"},
        "target": {"model": "tiny:llama-target", "device": "cpu"},
        "task": {"name": "demo", "align": "demo:align", "extract": "demo:extract", "eval": "demo:test"},
        "laten": {"data": {"max_length": 128}, "transfer": {"rate": 0.25}, "hypernet": {"init_std": 0.02},
                  "train": {"steps": 3, "align_per_step": 5, "micro_batch_size": 3, "lr": 1e-3}},
        "sft": {"rank": 4, "lr": 1e-3}, **extra}


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("arms=[target,laten,foo]", "arms[2]: unknown arm 'foo'"),
    ("seeds=[0,x]", "seeds[1]: expected a non-negative int, got 'x'"),
    ("seeds=true", "seeds: expected a count or a list of ints"),
    ("task.eval=missing.jsonl", "task.eval: data file"),
    ("arms=[target,laten-random-neurons]", "laten-random-neurons needs the laten arm"),
    ("arms=[laten]", "the target arm is needed"),
    ("laten.train.lr=-1", "laten.train.lr: must not be negative"),
    ("laten.train.speed=1", "unknown key 'laten.train.speed'"),
    ("task.evaluation={shots: 1}", "task.evaluation: shots: demo takes 0 to 0 shots"),
    ("engine=fast", "engine: 'fast' is not one of auto, hf, vllm"),
    ("budgets=[8,0]", "budgets[1]: expected a positive number of training steps, got 0"),
    ("budgets=[8,8]", "budgets: [8, 8] repeats a budget"),
    ("budgets=8", "budgets: expected a list, got 8"),
    ("laten.train.steps=5", "laten.train.steps: a study with budgets trains to its largest budget"),
    ("laten.train.schedule=one-cycle", "laten.train.schedule: one-cycle decays to the run's end"),
    ("laten.train.schedule=cosine", "laten.train.schedule: 'cosine' is not one of one-cycle, constant"),
    ("ray.train_workers=-1", "ray.train_workers: must not be negative, got -1"),
    ("ray.train_workers=1.5", "ray.train_workers: expected int, got 1.5"),
])
def test_a_bad_study_config_fails_before_any_model_loads_naming_the_key(tmp_path, monkeypatch, capsys,
                                                                       override, message):
    import laten_ray.models as models
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli(["study", "--config", DEMO, f"output_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"laten: error: override {override!r}: ") and message in err, err  # where it came from
    assert not (tmp_path / "demo").exists()


def test_seeds_are_a_count_or_a_list(tmp_path):
    assert tiny_study(tmp_path).seed_list == [0, 1, 2]
    assert tiny_study(tmp_path, seeds=[4, 7]).seed_list == [4, 7]


# --- the controls -------------------------------------------------------------------------------

def test_noise_source_keeps_row_norms_and_ignores_the_source_weights():
    g = torch.Generator().manual_seed(0)
    slices = {m: torch.randn(3, 5, 16, generator=g) for m in ("up", "v")}       # [L_t, K, d_s]
    a = Located({m: torch.arange(3) for m in slices}, {m: torch.zeros(3, 5, dtype=torch.long) for m in slices}, slices)
    # other source vectors with the same norms: a random rotation of every row
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    b = Located(a.layers, a.index, {m: s @ rotation for m, s in slices.items()})
    na, nb = noise_like(a, seed=1, salt=3), noise_like(b, seed=1, salt=3)
    for m, s in slices.items():
        assert torch.allclose(na.slices[m].norm(dim=-1), s.norm(dim=-1), atol=1e-5)
        assert torch.allclose(na.slices[m], nb.slices[m], atol=1e-5)              # only the norms matter
        cos = torch.nn.functional.cosine_similarity(na.slices[m], s, dim=-1)
        assert cos.abs().max() < 0.9                                               # not the source's vectors
    assert not torch.allclose(noise_like(a, seed=2, salt=3).slices["up"], na.slices["up"])  # seeded
    assert not torch.allclose(noise_like(a, seed=1, salt=4).slices["up"], na.slices["up"])  # per step


def test_random_neurons_keep_k_and_avoid_the_located_ones():
    index = {"up": torch.tensor([[0, 1, 2], [5, 6, 7]]), "o": torch.tensor([[3, 2, 1], [0, 9, 8]])}
    located = Located({m: torch.arange(2) for m in index}, index)
    out = random_neurons(located, {"up": 10, "o": 12}, seed=0)
    for m, idx in index.items():
        assert out.index[m].shape == idx.shape
        for layer in range(2):
            picked = set(out.index[m][layer].tolist())
            assert len(picked) == 3 and not picked & set(idx[layer].tolist())
    assert torch.equal(random_neurons(located, {"up": 10, "o": 12}, seed=0).index["up"], out.index["up"])
    with pytest.raises(ValueError, match="transfer.rate <= 0.5"):
        random_neurons(located, {"up": 5, "o": 12}, seed=0)


@pytest.mark.slow  # trains and merges four tiny arms
@pytest.mark.parametrize("family", FAMILIES)
def test_the_controls_and_the_lora_arms_on_real_builds(tmp_path, family):
    study = tiny_study(tmp_path, seeking={"seed_examples": 4, "rank": 4},
                       source={"model": f"tiny:{family}-source", "device": "cpu"},
                       target={"model": f"tiny:{family}-target", "device": "cpu"})
    folders = {arm: tmp_path / arm for arm in ("laten", "laten-random-neurons", "sft-lora", "seeking")}
    for arm, folder in folders.items():
        ARMS[arm].build(study, 1, folder, {"laten": folders["laten"]})

    laten = json.loads((folders["laten"] / "model" / "laten_merge.json").read_text())
    rand = json.loads((folders["laten-random-neurons"] / "model" / "laten_merge.json").read_text())
    assert rand["control"] == "random-neurons" and rand["step"] == laten["step"]
    for m, info in laten["modules"].items():
        for ours, theirs in zip(info["layers"], rand["modules"][m]["layers"]):
            assert len(theirs["target_index"]) == len(ours["target_index"])          # same K
            assert not set(theirs["target_index"]) & set(ours["target_index"])       # elsewhere
            assert theirs["delta_norm"] == pytest.approx(ours["delta_norm"])         # the same deltas
            assert theirs["source_index"] == ours["source_index"]

    # sft-lora trained on exactly LaTen's examples, in LaTen's order, one optimizer step per step
    laten_steps = [json.loads(line)["examples"] for line in (folders["laten"] / "run" / "metrics.jsonl").open()]
    assert json.loads((folders["sft-lora"] / "sft" / "examples.json").read_text()) == laten_steps
    assert len((folders["sft-lora"] / "sft" / "metrics.jsonl").read_text().splitlines()) == len(laten_steps) == 3

    from transformers import AutoModelForCausalLM
    from laten_ray.models import resolve
    tuned = AutoModelForCausalLM.from_pretrained(folders["sft-lora"] / "model")  # plain transformers
    base = AutoModelForCausalLM.from_pretrained(resolve(f"tiny:{family}-target"))
    w = "model.layers.0.mlp.up_proj.weight"
    assert tuned.state_dict()[w].shape == base.state_dict()[w].shape
    assert not torch.equal(tuned.state_dict()[w], base.state_dict()[w])            # LoRA merged in

    # seeking: its plan names a source layer for each target layer, and it trained on sft-lora's steps
    plan = json.loads((folders["seeking"] / "seeking" / "plan.json").read_text())
    assert len(plan["chosen"]) == base.config.num_hidden_layers and plan["chosen"] == sorted(plan["chosen"])
    assert json.loads((folders["seeking"] / "sft" / "examples.json").read_text()) == laten_steps
    seeking = AutoModelForCausalLM.from_pretrained(folders["seeking"] / "model")
    assert not torch.equal(seeking.state_dict()[w], base.state_dict()[w])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(folder / "model.safetensors")


@pytest.mark.slow  # trains two tiny arms twice
@pytest.mark.parametrize("arm", ["laten", "sft-lora"])
def test_a_budget_checkpoint_is_the_model_of_a_run_that_long(tmp_path, arm):
    """Trained once to 5 steps and kept at 2, the model of budget 2 is the model a run of 2 steps
    gives: bit for bit here (CPU, float32; the stated tolerance is exact equality, which
    nondeterministic GPU kernels would relax to rounding)."""
    warm = {"warmup_steps": 1, "steps": None}
    long = tiny_study(tmp_path / "long", budgets=[2, 5], laten={**tiny_study(tmp_path).laten,
                                                                 "train": {**tiny_study(tmp_path).laten["train"], **warm}})
    short = tiny_study(tmp_path / "short", budgets=[2], laten=long.laten)
    a, b = ARMS[arm].build(long, 0, tmp_path / "a", {}), ARMS[arm].build(short, 0, tmp_path / "b", {})
    assert set(a["models"]) == {"2", "5"} and set(b["models"]) == {"2"}
    two, alone = _weights(tmp_path / "a" / a["models"]["2"]), _weights(tmp_path / "b" / b["models"]["2"])
    five = _weights(tmp_path / "a" / a["models"]["5"])
    assert two.keys() == alone.keys()
    assert all(torch.equal(two[k], alone[k]) for k in two)
    assert any(not torch.equal(two[k], five[k]) for k in two)  # training went on after budget 2
    cfg = long.run_config(0)
    assert (cfg.train.schedule, cfg.train.warmup_steps, cfg.train.steps) == ("constant", 1, 5)
    if arm == "laten":  # the run keeps the budgets' checkpoints and its last, no other
        from laten_ray.checkpoint import checkpoint_steps
        assert checkpoint_steps(tmp_path / "a" / "run") == [2, 5]


def test_lora_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    from laten_ray.data import read_examples
    from laten_ray.lora import LoraSettings, Optim, finetune
    from laten_ray.models import load_model, load_tokenizer

    examples = read_examples("demo:align")
    steps = [examples[i:i + 3] for i in range(0, 12, 3)]  # 4 steps of 3
    tokenizer = load_tokenizer("tiny:llama-target")
    settings, optim = LoraSettings(rank=4, lr=1e-3), Optim(micro_batch_size=2, max_length=96)

    def weights(folder, crash_after=None):
        def on_step(m):
            if m["step"] == crash_after:
                raise KeyboardInterrupt  # a crash right after the step's state is on disk
        model = load_model("tiny:llama-target")
        try:
            merged, history = finetune(model, tokenizer, steps, settings, optim, 0, folder, on_step)
        except KeyboardInterrupt:
            return None
        return merged.state_dict(), history

    whole, history = weights(tmp_path / "a")
    assert weights(tmp_path / "b", crash_after=2) is None
    resumed, resumed_history = weights(tmp_path / "b")
    assert [m["lm_loss"] for m in resumed_history] == [m["lm_loss"] for m in history]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


# --- end to end on Ray --------------------------------------------------------------------------

def _study(out: Path, *overrides, kill_after: int | None = None, kill_a_worker: list | None = None) -> list[str]:
    """`python -m jobs.study` on the demo config (one seed). With kill_after, SIGKILL the driver
    and every process it started once that many arms have been evaluated; with kill_a_worker,
    first SIGKILL a Ray worker in the middle of a build (its pid is appended to the list)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "jobs.study", "--config", DEMO, "--address", "local",  # a cluster of its own
           f"output_dir={out}", "seeds=1", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if kill_a_worker is not None:
        threading.Thread(target=_kill_a_build, args=(kill_a_worker,), daemon=True).start()
    lines, finished = [], 0
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        finished += " accuracy " in line and "% CI" in line
        if kill_after is not None and finished >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=600)
    if kill_after is None:
        assert proc.returncode == 0, "\n".join(lines[-40:])
    return lines


def _kill_a_build(killed: list, timeout_s: float = 120) -> None:
    """SIGKILL the first Ray worker seen running a build (Ray titles it `ray::build_unit`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if title.startswith(b"ray::build_unit"):
                time.sleep(1.0)  # into the build's work
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.2)


def _without_times(results: dict) -> dict:
    out = {k: v for k, v in results.items() if k != "timing"}
    out["config"] = {k: v for k, v in results["config"].items() if k != "output_dir"}
    return out


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies")
    return out / "demo", _study(out)


@pytest.mark.ray
@pytest.mark.slow
def test_the_demo_study_end_to_end(demo_study):
    import matplotlib.image

    from laten_ray.score_cache import computed

    folder, lines = demo_study
    results = json.loads((folder / "results.json").read_text())
    budgets = [8, 32, 128]
    assert results["budgets"] == budgets and results["items"] == 200 and not results["missing"]
    assert [(a["arm"], a["budget"]) for a in results["arms"]] == \
        [("target", None), ("source", None)] + [(arm, b) for arm in ARMS_IN_DEMO[2:] for b in budgets]
    plan = json.loads((folder / "plan.json").read_text())
    for unit in plan["units"]:
        built = json.loads((folder / unit["folder"] / "built.json").read_text())
        for key, ev in unit["evals"].items():
            assert len((folder / ev / "examples.jsonl").read_text().splitlines()) == 200
            if unit["arm"] not in ("target", "source"):
                assert (folder / unit["folder"] / built["models"][key] / "config.json").is_file()
    # a learning curve per trained arm, in results.json and in the figure
    assert sorted(results["curves"]) == sorted(ARMS_IN_DEMO[2:])
    assert all([p["budget"] for p in curve] == budgets for curve in results["curves"].values())
    for name in ("curves.png", "scores.png", "training.png"):
        image = matplotlib.image.imread(folder / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    # the pair is worth studying: the source solves the held-out split, the target does not
    row = {(a["arm"], a["budget"]): a for a in results["arms"]}
    assert row["source", None]["score"] >= 0.8 and row["target", None]["score"] <= 0.2
    # the positive control: the equal-data baseline is significantly above the target at the top budget
    control = row["sft-lora", 128]["vs_target"]
    assert control["verdict"] == "higher" and control["p_holm"] < 0.05 and control["difference"] > control["mdd"]
    for a in results["arms"][1:]:
        c = a["vs_target"]
        assert c["ci95"][0] <= c["difference"] <= c["ci95"][1] and 0 <= c["p_holm"] <= 1 and 0 < c["mdd"] <= 1
        assert c["test"] in ("exact McNemar on paired items",)

    report = (folder / "report.md").read_text()
    first = report.split("**Finding.** ", 1)[1].splitlines()[0]
    assert first.startswith("After 128 training steps") and "sft-lora beats the target by" in first
    assert "LaTen" in first and "equal-data baseline sft-lora" in first
    if row["laten", 128]["vs_target"]["verdict"] == "no detectable difference":
        assert f"rules out a gain larger than {100 * row['laten', 128]['vs_target']['mdd']:.1f} points" in first
    for figure in ("curves.png", "scores.png", "training.png"):  # embedded, and there
        assert f"]({figure})" in report and (folder / figure).is_file()
    assert "exact McNemar on paired items" in report and "MDD" in report and "Connor" in report
    table = report.split("## Per seed")[0]
    same = {}  # rows with identical per-item results are one row naming them all
    for a in results["arms"]:
        same.setdefault((a["items"], a["budget"]), []).append(a["arm"])
    for (_, budget), arms in same.items():
        assert sum(f"| {', '.join(arms)} | {'-' if budget is None else budget} |" in line
                   for line in table.splitlines()) == 1, arms

    # what each merge added: float32 weights keep the whole delta; the overlap is a Jaccard index
    merged = {(m["arm"], m["budget"]): m for m in results["merges"]}
    assert set(merged) == {(a, b) for a in ("laten", "laten-random-neurons", "laten-noise-source") for b in budgets}
    assert all(m["delta_survival_min"] == pytest.approx(1.0, abs=1e-3) and 0 <= m["training_overlap"] <= 1
               for m in merged.values())
    assert merged["laten-random-neurons", 128]["training_overlap"] < merged["laten", 128]["training_overlap"]
    assert "## What the merges added" in report

    # attribution ran once per (model, example) in the whole study: 8 extract examples, 2 models
    log = computed(folder / "attribution-cache")
    assert len(log) == 2 and all(len(v) == len(set(v)) == 8 for v in log.values()), log

    # the report is rebuilt from the kept results alone, to the same bytes
    before = {n: (folder / n).read_bytes() for n in ("results.json", "report.md", "disagreements.md")}
    assert cli(["report", str(folder)]) == 0
    assert {n: (folder / n).read_bytes() for n in before} == before

    # a rerun does nothing but report
    again = _study(folder.parent)
    assert any(f"{len(results['arms'])} evaluation(s) and their builds done earlier, kept" in line for line in again)
    assert not any(": building" in line or " accuracy " in line for line in again)
    assert (folder / "results.json").read_bytes() == before["results.json"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_study_resumes_to_the_same_results(demo_study, tmp_path):
    """A worker killed in a build (Ray runs the build again, which resumes from its folder),
    then the driver and its local cluster killed (SIGKILL) after three evaluations: the rerun
    ends with the results and the report of the uninterrupted study."""
    folder, _ = demo_study
    killed: list[int] = []
    lines = _study(tmp_path, kill_after=3, kill_a_worker=killed)
    assert killed, "no build worker was seen to kill"
    assert not (tmp_path / "demo" / "results.json").exists(), "\n".join(lines)
    resumed = _study(tmp_path)
    assert any("done earlier, kept" in line for line in resumed)
    ours = json.loads((tmp_path / "demo" / "results.json").read_text())
    theirs = json.loads((folder / "results.json").read_text())
    assert _without_times(ours) == _without_times(theirs)
    assert (tmp_path / "demo" / "report.md").read_text().split("## Time")[0] == \
        (folder / "report.md").read_text().split("## Time")[0]


ARMS_IN_DEMO = ["target", "source", "laten", "laten-random-neurons", "laten-noise-source", "sft-lora", "seeking",
                "distill"]


@pytest.mark.parametrize("task", ["gsm", "mmlu", "humaneval", "mbpp"])
def test_the_paper_scale_study_configs_load(task):
    from laten_ray.study.config import load_study
    study = load_study(REPO / "configs" / f"study-{task}.yaml",
                       ["source.model=tiny:llama-source", "target.model=tiny:llama-target"])
    assert study.arms == ARMS_IN_DEMO and study.seed_list == [0, 1, 2]
    assert study.run_config(0).data.align.endswith(f"{task}_align_split.jsonl")


def test_distill_trains_on_the_source_greedy_answers_to_latens_examples(tmp_path):
    from transformers import AutoModelForCausalLM

    from laten_ray.data import chat_prompt
    from laten_ray.models import load_model, load_tokenizer
    from laten_ray.study.arms import laten_steps
    study = tiny_study(tmp_path, source={"model": "tiny:demo-source", "device": "cpu"},
                       target={"model": "tiny:demo-target", "device": "cpu"}, engine="hf",
                       distill={"max_tokens": 40})
    folder = tmp_path / "distill"
    ARMS["distill"].build(study, 0, folder, {})
    _, steps, labels = laten_steps(study, 0)
    answers = [json.loads(line) for line in (folder / "distill" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["example"] for a in answers) == sorted({lab for step in labels for lab in step})
    assert json.loads((folder / "sft" / "examples.json").read_text()) == labels

    # each answer is the source's own greedy continuation of the training prompt
    tokenizer, source = load_tokenizer("tiny:demo-source"), load_model("tiny:demo-source")
    first = answers[0]
    ids = tokenizer(first["prompt"], return_tensors="pt")["input_ids"]
    out = source.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert first["answer"] == text.split("<|user|>")[0].strip()
    by_label = dict(zip(itertools.chain(*labels), itertools.chain(*steps)))
    assert first["prompt"] == chat_prompt(by_label[first["example"]].messages)
    # the demo source knows the table: its answers are the references on most examples
    assert sum(a["answer"] == a["reference"] for a in answers) >= 0.8 * len(answers)
    AutoModelForCausalLM.from_pretrained(folder / "model")  # plain transformers
