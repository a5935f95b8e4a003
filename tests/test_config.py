"""Config loading, `key=value` overrides and validation: every bad input names its key."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from helpers import tiny_config_dict
from laten_ray.arch import MODULES, Shape, family_of, shape_of
from laten_ray.checks import load_checked
from laten_ray.config import (Config, ConfigError, TrainConfig, config_from_dict,
                              load_config)
from laten_ray.data import read_examples
from laten_ray.locate import neuron_counts, top_neurons
from laten_ray.builtin.tiny import tiny_config

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def load(*overrides: str) -> Config:
    return load_checked(TINY_YAML, list(overrides))


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    return str(info.value)


# --- the shipped config -----------------------------------------------------------------------

def test_tiny_yaml_loads_with_the_right_types():
    cfg = load()
    assert cfg.name == "tiny" and cfg.run_dir == Path("runs") / "tiny"
    assert cfg.source.model == "tiny:demo-source" and cfg.target.model == "tiny:demo-target"
    assert (cfg.source.dtype, cfg.source.device) == ("float32", "cpu")
    assert cfg.data.align == "demo:align" and cfg.data.extract == "demo:extract"
    assert cfg.data.max_length == 256 and type(cfg.data.max_length) is int
    assert cfg.data.train_on_inputs is False
    assert type(cfg.transfer.rate) is float and cfg.transfer.rate == 0.1
    assert cfg.transfer.modules == ["up", "down", "v", "o"]
    assert type(cfg.hypernet.init_std) is float and cfg.hypernet.init_std == 1e-4
    assert cfg.hypernet.hidden is None
    assert cfg.train.steps is None  # one step per extract example
    assert type(cfg.train.lr) is float and cfg.train.lr == 3e-4
    # reg_lambda is written 1000.0; ints given for floats become floats
    assert type(cfg.train.reg_lambda) is float and cfg.train.reg_lambda == 1000.0
    assert cfg.train.betas == TrainConfig().betas
    assert cfg.merge.seed_example == 0 and cfg.merge.rate is None


def test_config_from_dict_of_the_test_fixture(tmp_path):
    for family in ("llama", "qwen2"):
        cfg = config_from_dict(tiny_config_dict(family, tmp_path, lr=2e-3))
        assert cfg.source.model == f"tiny:{family}-source"
        assert cfg.run_dir == tmp_path / f"{family}-run"
        assert cfg.train.lr == 2e-3 and cfg.train.steps == 3
        assert cfg.transfer.modules == list(MODULES)


def test_to_dict_round_trips(tmp_path):
    cfg = load("transfer.modules=[up, o]", "train.steps=null")
    assert config_from_dict(cfg.to_dict()) == cfg


# --- overrides --------------------------------------------------------------------------------

def test_nested_float_override():
    assert load("train.lr=1.0e-4").train.lr == 1e-4
    assert load("transfer.rate=1").transfer.rate == 1.0


def test_exponent_without_a_dot_is_a_float(tmp_path):
    """YAML 1.1 would read 1e-4 as a string; in overrides and in files it is a float."""
    assert load("train.lr=1e-4").train.lr == 1e-4
    path = tmp_path / "c.yaml"
    path.write_text(TINY_YAML.read_text().replace("lr: 3.0e-4", "lr: 3e-4"))
    assert "lr: 3e-4" in path.read_text()
    assert load_config(path).train.lr == 3e-4


def test_list_override():
    assert load("transfer.modules=[up,down]").transfer.modules == ["up", "down"]


def test_null_override():
    assert load("train.steps=null").train.steps is None
    assert load("hypernet.hidden=null").hypernet.hidden is None


def test_other_overrides():
    cfg = load("data.train_on_inputs=true", "name=other", "output_dir=/tmp/x", "seed=3",
               "source.device=cuda:1", "target.dtype=bfloat16", "merge.rate=0.5")
    assert cfg.data.train_on_inputs is True
    assert cfg.run_dir == Path("/tmp/x/other")
    assert cfg.seed == 3 and cfg.source.device == "cuda:1" and cfg.target.dtype == "bfloat16"
    assert cfg.merge.rate == 0.5


def test_overrides_do_not_touch_the_file():
    before = TINY_YAML.read_text()
    load("train.lr=1.0e-2")
    assert TINY_YAML.read_text() == before
    assert load().train.lr == 3e-4


def test_rate_of_one_is_accepted():
    assert load("transfer.rate=1.0").transfer.rate == 1.0


def test_an_existing_data_file_is_accepted(tmp_path):
    path = tmp_path / "align.jsonl"
    line = json.dumps({"messages": [{"role": "user", "content": "2 x 3?"}, {"role": "assistant", "content": "6"}]})
    path.write_text((line + "\n") * 15)  # as many as train.align_per_step draws
    assert load(f"data.align={path}").data.align == str(path)


def test_an_empty_align_file_is_named(tmp_path):
    path = tmp_path / "align.jsonl"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"data.align: .*align.jsonl: no examples"):
        load(f"data.align={path}")


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, problem", [
    ("bogus=1", "unknown key 'bogus'", "known here"),
    ("train.lrr=1", "unknown key 'train.lrr'", "known here"),
    ("source.modle=tiny:llama-source", "unknown key 'source.modle'", "known here"),
    ("train.lr=abc", "train.lr", "expected float, got 'abc'"),
    ("train.steps=1.5", "train.steps", "expected int, got 1.5"),
    ("train.steps=true", "train.steps", "expected int, got True"),
    ("data.train_on_inputs=3", "data.train_on_inputs", "expected bool, got 3"),
    ("data.max_length=0", "data.max_length", "at least 1"),
    ("train=5", "train", "expected a mapping"),
    ("transfer.modules=up", "transfer.modules", "expected a list"),
    ("transfer.rate=0", "transfer.rate", r"must be in \(0, 1\]"),
    ("transfer.rate=-0.1", "transfer.rate", r"must be in \(0, 1\]"),
    ("transfer.rate=1.5", "transfer.rate", r"must be in \(0, 1\]"),
    ("merge.rate=2", "merge.rate", r"must be in \(0, 1\]"),
    ("transfer.modules=[up,gate]", "transfer.modules", "up, down, v, o"),
    ("transfer.modules=[up,up]", "transfer.modules", "distinct"),
    ("transfer.modules=[]", "transfer.modules", "distinct"),
    ("data.align=/nope.jsonl", "data.align", "data file '/nope.jsonl' not found"),
    ("data.extract=demo:nope", "data.extract", "unknown demo split 'demo:nope'"),
    ("merge.seed_data=/nope.jsonl", "merge.seed_data", "not found"),
    ("source.model=/no/such/dir", "source.model", "model folder '/no/such/dir' not found"),
    ("target.model=tiny:nope", "target.model", "unknown tiny model 'tiny:nope'"),
    ("source.model=", "source.model", "missing"),
    ("source.dtype=fp8", "source.dtype", "'fp8' is not one of float32, bfloat16, float16"),
    ("merge.dtype=half", "merge.dtype", "'half' is not one of float32, bfloat16, float16"),
    ("target.device=tpu", "target.device", "'tpu' is not auto, cpu, cuda or cuda:N"),
    ("train.betas=[0.9]", "train.betas", "two numbers"),
    ("train.warmup_ratio=1.0", "train.warmup_ratio", r"\[0, 1\)"),
    ("train.lr=-1.0", "train.lr", "must not be negative"),
    ("name=a/b", "name", "folder name"),
    ("ray.lookahead=-1", "ray.lookahead", "must not be negative"),
    ("ray.max_restarts=-2", "ray.max_restarts", "must not be negative"),
    ("ray.transport=tcp", "ray.transport", "'tcp' is not one of object_store, nccl, gloo, nixl, cuda_ipc"),
    ("ray.transport=nccl", "ray.transport", "nccl moves GPU tensors but source.device is 'cpu'"),
    ("ray.placement_strategy=RANDOM", "ray.placement_strategy", "'RANDOM' is not one of PACK"),
    ("ray.target.num_gpus=-1", "ray.target.num_gpus", "must not be negative"),
    ("ray.source.gpus=1", "unknown key 'ray.source.gpus'", "known here: num_cpus, num_gpus"),
])
def test_bad_value_names_the_key(override, key, problem):
    message = config_error(override)
    assert message.startswith(f"override {override!r}: {key}"), message  # the value came from the command line
    assert re.search(problem, message), message


def test_unknown_key_lists_the_known_ones():
    assert "known here: align_per_step, betas, gradient_checkpointing, lr," in config_error("train.lrr=1")


def test_unknown_tiny_preset_lists_the_presets():
    assert "tiny:qwen2-target" in config_error("target.model=tiny:nope")


def test_override_without_equals_sign():
    assert config_error("train.lr") == "override 'train.lr' is not key=value"


def test_override_below_a_plain_value():
    assert "'name' is not a section" in config_error("name.x=1")


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"config file '{re.escape(str(path))}' not found"):
        load_config(path)


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1, 2\n  steps: 3\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: not valid YAML"):
        load_config(path)


def test_yaml_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_config_from_dict_errors_name_the_key(tmp_path):
    tree = tiny_config_dict("qwen2", tmp_path)
    tree["transfer"]["rate"] = 0
    with pytest.raises(ConfigError, match=r"^transfer\.rate: "):
        config_from_dict(tree)
    tree = tiny_config_dict("qwen2", tmp_path, micro_batch_size="3")
    with pytest.raises(ConfigError, match=r"^train\.micro_batch_size: expected int, got '3'"):
        config_from_dict(tree)


# --- sizes that only the models can check -----------------------------------------------------

def shape(name: str) -> Shape:
    return shape_of(tiny_config(name, vocab_size=512))


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_neuron_counts_rejects_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
        neuron_counts(shape("llama-target"), rate, MODULES)


def test_neuron_counts_follow_the_targets_sizes():
    target = shape("qwen2-target")  # ffn 192, 4 heads x 24, 2 kv heads
    assert neuron_counts(target, 0.25, MODULES) == {"up": 48, "down": 48, "o": 24, "v": 12}
    assert neuron_counts(target, 1.0, ["v"]) == {"v": 48}
    assert neuron_counts(target, 1e-6, ["up"]) == {"up": 1}


def test_k_above_the_sources_neurons_says_lower_the_rate():
    # qwen2 tiny pair: source v has 2 x 16 = 32 rows, target v has 2 x 24 = 48
    source, target = shape("qwen2-source"), shape("qwen2-target")
    k = neuron_counts(target, 0.9, ["v"])["v"]
    assert k > source.neurons("v")
    v_scores = torch.randn(source.n_layers, source.neurons("v"))
    with pytest.raises(ValueError, match=rf"source v: K={k} neurons asked for but only 32 exist; "
                                         "lower the rate"):
        top_neurons(v_scores, k, "source v")
    index, values = top_neurons(v_scores, 32, "source v")
    assert index.shape == values.shape == (source.n_layers, 32)


def test_unsupported_family_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'; supported model types: gemma2, "
                                         r"gemma3_text, llama, mistral, olmo2, phi3, qwen2, qwen3, smollm3 "):
        family_of(transformers.GPT2Config())
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "smollm3"):
        family_of(transformers.AutoConfig.for_model(model_type))
    with pytest.raises(ValueError, match=r"'gemma3': a multimodal Gemma 3 checkpoint .* gemma3_text"):
        family_of(transformers.AutoConfig.for_model("gemma3"))


def test_families_file_errors_name_the_entry(tmp_path):
    """families.yaml is data: an unknown key or a model type claimed by two entries is an error
    naming the file and the entry, not a silent default."""
    from laten_ray.arch import FAMILIES_FILE, read_families
    text = FAMILIES_FILE.read_text()
    bad = tmp_path / "families.yaml"
    bad.write_text(text + "\nmine:\n  model_types: [mine]\n  post_norm: x\n")
    with pytest.raises(ValueError, match=r"families.yaml: family mine: unknown key\(s\) post_norm"):
        read_families(bad)
    bad.write_text(text + "\nmine:\n  model_types: [qwen3]\n  notes: x\n")
    with pytest.raises(ValueError, match=r"model_type 'qwen3' is in both qwen3 and mine"):
        read_families(bad)


def test_rate_too_high_for_the_source_fails_at_load_time():
    """Checked from config.json alone, before any weights load."""
    message = config_error("source.model=tiny:qwen2-source", "target.model=tiny:qwen2-target",
                           "transfer.rate=0.9")
    assert "transfer.rate: 0.9 asks for K=43 v neurons per layer but the source has 32" in message


def test_source_shallower_than_target_fails_at_load_time():
    message = config_error("source.model=tiny:llama-target", "target.model=tiny:llama-source")
    assert "source.model: 4 layers, fewer than the target's 6" in message


def test_unsupported_model_folder_fails_at_load_time(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=512).save_pretrained(tmp_path)
    message = config_error(f"source.model={tmp_path}")
    assert "source.model: unsupported architecture 'gpt2'" in message


@pytest.mark.parametrize("task", ["gsm", "mmlu", "humaneval", "mbpp"])
def test_task_configs_load_with_their_data_from_any_directory(task, tmp_path, monkeypatch):
    path = TINY_YAML.parent / f"{task}.yaml"
    # as shipped they name Llama-2 folders this machine lacks: a clear error, before any load
    with pytest.raises(ConfigError, match=r"source\.model: model folder .*Llama-2-13b"):
        load_checked(path)
    monkeypatch.chdir(tmp_path)  # data/... is the repository's data folder wherever we run
    cfg = load_checked(path, ["source.model=tiny:llama-source", "target.model=tiny:llama-target"])
    assert cfg.data.align == f"data/{task}/{task}_align_split.jsonl"
    assert len(read_examples(cfg.data.align)) == {"mbpp": 40}.get(task, 80)
    assert len(read_examples(cfg.data.extract)) == {"mbpp": 32}.get(task, 20)
    assert cfg.transfer.rate == 0.1 and cfg.data.max_length == 1024
    assert cfg.source.dtype == "bfloat16" and cfg.train.reg_lambda == 1000.0
    assert cfg.data.train_on_inputs is (task == "mmlu")


def test_relative_data_files_are_anchored_at_the_config_file_or_the_shell(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.jsonl").write_text(  # as many as train.align_per_step draws
        '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n' * 15)
    config = tmp_path / "exp" / "run.yaml"
    config.write_text(TINY_YAML.read_text() + "\ndata: {align: mine.jsonl, extract: demo:extract}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_checked(config)  # mine.jsonl beside the config, not in the working directory
    assert cfg.data.align == str(tmp_path / "exp" / "mine.jsonl")
    cfg = load_checked(config, ["data.align=exp/mine.jsonl"])  # on the command line: the shell's
    assert cfg.data.align == str(tmp_path / "exp" / "mine.jsonl")
    config.write_text(config.read_text().replace("align: mine.jsonl", "align: exp/mine.jsonl"))
    with pytest.raises(ConfigError, match=r"run\.yaml: data\.align: data file '.*/exp/exp/mine\.jsonl' not found"):
        load_checked(config)


def test_the_old_trainer_section_says_where_it_went():
    assert "configured under ray.target" in config_error("ray.trainer.num_cpus=2")


# --- configs as deltas of a base --------------------------------------------------------------

def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_config_reads_as_its_base_with_its_own_values_on_top(tmp_path):
    write(tmp_path / "base" / "pair.yaml", "output_dir: runs\nsource: {model: 'tiny:llama-source', device: cpu}\n"
          "target: {model: 'tiny:llama-target', device: cpu}\ndata: {align: align.jsonl, max_length: 128}\n"
          "train: {lr: 1.0e-3, steps: 3}\n")
    write(tmp_path / "base" / "align.jsonl", "")
    child = write(tmp_path / "child.yaml", "base: base/pair.yaml\nname: child\ntrain: {steps: 5}\n"
                  "data: {extract: demo:extract}\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.train.steps, cfg.train.lr) == ("child", 5, 1e-3)  # mappings merge key by key
    assert cfg.data.extract == "demo:extract" and cfg.data.max_length == 128
    assert cfg.data.align == str(tmp_path / "base" / "align.jsonl")  # anchored at the file that names it
    assert load_config(child, ["train.steps=7"]).train.steps == 7  # overrides on top of both


def test_an_error_names_the_file_or_override_its_value_came_from(tmp_path):
    write(tmp_path / "base.yaml", "source: {model: 'tiny:llama-source'}\ntarget: {model: 'tiny:llama-target'}\n"
          "train: {lr: -1.0}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: c\ntransfer: {rate: 0.1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'base.yaml'} (base of {child}): train.lr: must "
                                                    "not be negative")):
        load_config(child)
    write(child, "base: base.yaml\nname: c\ntrain: {lr: 1.0, stepz: 1}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{child}: unknown key 'train.stepz'")):
        load_config(child)
    write(child, "base: base.yaml\nname: c\ntrain: {lr: 1.0}\n")
    with pytest.raises(ConfigError, match=re.escape("override 'transfer.rate=2': transfer.rate: rate must be in")):
        load_config(child, ["transfer.rate=2"])


def test_a_missing_or_circular_base_is_named(tmp_path):
    write(tmp_path / "paper.yaml", "seed: 1\n")
    child = write(tmp_path / "child.yaml", "base: papr.yaml\n")
    with pytest.raises(ConfigError, match="papr.yaml' not found; did you mean '.*paper.yaml'"):
        load_config(child)
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: 'a.yaml' leads back to itself"):
        load_config(tmp_path / "a.yaml")
    write(child, "base: [paper.yaml]\n")
    with pytest.raises(ConfigError, match="base: expected the file this config overrides"):
        load_config(child)


def test_the_shipped_paper_configs_are_deltas_of_one_base_each():
    from laten_ray.config import DATA_KEYS, read_tree
    from laten_ray.study.config import DATA_KEYS as STUDY_DATA
    configs = Path(__file__).resolve().parents[1] / "configs"
    runs = {t: read_tree(configs / f"{t}.yaml", [], DATA_KEYS)[0] for t in ("gsm", "mmlu", "humaneval", "mbpp")}
    for t, tree in runs.items():
        assert "base: base/paper-llama2.yaml" in (configs / f"{t}.yaml").read_text()
        assert tree["data"]["align"] == f"data/{t}/{t}_align_split.jsonl" and tree["train"]["lr"] == 3e-4
        assert tree["source"]["model"] == "models/Llama-2-13b-chat-hf" and tree["data"]["max_length"] == 1024
    assert runs["mmlu"]["data"]["train_on_inputs"] is True and "train_on_inputs" not in runs["gsm"]["data"]
    for t in ("gsm", "mmlu", "humaneval", "mbpp"):
        tree = read_tree(configs / f"study-{t}.yaml", [], [("task", k) for k in STUDY_DATA])[0]
        assert tree["laten"]["train"]["lr"] == 3e-4 and tree["ray"]["eval_num_gpus"] == 1
        assert tree["laten"]["data"]["train_on_inputs"] is (t == "mmlu")


def test_list_overrides_say_how_a_list_is_written():
    assert "e.g. 'transfer.modules=[up,down]' (quoted on the command line" in config_error("transfer.modules=up,down")
    assert "quoted so the shell keeps it one word" in config_error("transfer.modules=[up,")
    assert "quoted so the shell keeps it one word" in config_error("down]")
