"""Merge writes a plain HF folder whose logits equal the injected model's; only chosen rows/columns change."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from laten_ray import checkpoint as ckpt
from laten_ray.arch import NEURON_AXIS, Arch
from laten_ray.config import config_from_dict
from laten_ray.inject import injected
from laten_ray.locate import Source, Target
from laten_ray.merge import REPORT, load_hypernet, merge, plan_edit, seed_example
from laten_ray.train import train

from helpers import FAMILIES, tiny_config_dict


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_folder_matches_injected_model(tmp_path, family):
    cfg = config_from_dict(tiny_config_dict(family, tmp_path, steps=2))
    train(cfg)
    out = merge(cfg, step=2, rate=0.2, out=tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, nothing of ours
    report = json.loads((out / REPORT).read_text())
    assert report["step"] == 2 and report["rate"] == 0.2

    # the same edit applied through hooks on a fresh target
    source, target = Source(cfg), Target(cfg, rate=0.2)
    hypernet = load_hypernet(cfg, ckpt.load_checkpoint(cfg.run_dir, 2), source.arch.shape.hidden, target)
    _, selected, deltas = plan_edit(source, target, hypernet, [seed_example(cfg)])
    ids = torch.randint(0, target.arch.shape.vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with injected(target.arch, selected.index, deltas):
            want = target.model(ids).logits
        plain = target.model(ids).logits
        got = merged(ids).logits
    assert (want - plain).abs().max() > 1e-5  # the transfer changed the model
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # only the selected rows/columns differ from the untouched target
    arch_m = Arch(merged)
    changed_params = set()
    for (name, p), (_, q) in zip(merged.named_parameters(), target.model.named_parameters()):
        if not torch.equal(p, q):
            changed_params.add(name)
    for m, axis in NEURON_AXIS.items():
        if m not in cfg.transfer.modules:
            continue
        for i in range(target.arch.shape.n_layers):
            diff = (arch_m.weight(i, m) - target.arch.weight(i, m)).abs()
            moved = (diff.sum(dim=1 - axis) > 0).nonzero().flatten()
            assert set(moved.tolist()) <= set(selected.index[m][i].tolist()), (m, i)
            assert len(moved) > 0
            layer = report["modules"][m]["layers"][i]
            assert layer["target_index"] == selected.index[m][i].tolist()
    allowed = {n for n in changed_params if any(k in n for k in ("up_proj", "down_proj", "v_proj", "o_proj"))}
    assert changed_params == allowed


def test_merge_refuses_a_non_empty_output_and_a_missing_step(tmp_path):
    cfg = config_from_dict(tiny_config_dict("llama", tmp_path, steps=1))
    train(cfg)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        merge(cfg, step=1, rate=None, out=tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="step 7"):
        merge(cfg, step=7, rate=None, out=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_overwrite_replaces_only_an_earlier_merge(tmp_path):
    cfg = config_from_dict(tiny_config_dict("llama", tmp_path, steps=1))
    train(cfg)
    out = merge(cfg, step=1, rate=0.1, out=tmp_path / "merged")
    first = json.loads((out / REPORT).read_text())
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(cfg, step=1, rate=0.2, out=out)
    merge(cfg, step=1, rate=0.2, out=out, overwrite=True)
    assert json.loads((out / REPORT).read_text())["rate"] == 0.2 != first["rate"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a merged model"):
        merge(cfg, step=1, rate=0.2, out=tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_merge_dtype_sets_the_saved_weights_dtype(tmp_path):
    cfg = config_from_dict({**tiny_config_dict("qwen2", tmp_path, steps=1),
                            "target": {"model": "tiny:qwen2-target", "device": "cpu", "dtype": "bfloat16"}})
    train(cfg)
    as_target = merge(cfg, step=1, rate=0.2, out=tmp_path / "bf16")
    assert json.loads((as_target / REPORT).read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(as_target).model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    cfg.merge.dtype = "float32"
    full = merge(cfg, step=1, rate=0.2, out=tmp_path / "fp32")
    assert json.loads((full / REPORT).read_text())["dtype"] == "float32"
    assert AutoModelForCausalLM.from_pretrained(full).model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def test_the_merge_measures_how_much_of_the_delta_survives(tmp_path):
    """All of it in float32 weights; with a tiny delta in bfloat16 weights most rounds away, and
    the merge says so, naming the dtype and merge.dtype."""
    tree = tiny_config_dict("llama", tmp_path, steps=1, lr=1e-9)  # AdamW's step is about lr: the init stays
    tree["hypernet"] = {"init_std": 1e-6}  # a tiny delta, as the paper's init and regulariser give
    cfg = config_from_dict(tree)
    train(cfg)
    said = []
    full = merge(cfg, 1, None, tmp_path / "fp32", say=said.append)
    survival = json.loads((full / REPORT).read_text())["delta_survival"]
    assert set(survival) == {"up", "down", "v", "o", "all"}
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in survival.values())
    assert said[0].startswith("delta survival: 100.0% of the trained delta is in the saved float32 weights")

    cfg.target.dtype = "bfloat16"
    said.clear()
    half = merge(cfg, 1, None, tmp_path / "bf16", say=said.append)
    survival = json.loads((half / REPORT).read_text())["delta_survival"]
    assert survival["all"] < 0.5
    assert "warning: less than half of the trained delta survived rounding to bfloat16" in said[0]
    assert "merge.dtype=float32" in said[0]


def test_merge_locate_and_its_overlap_with_training(tmp_path):
    """merge.locate picks the neurons from one example (the paper's) or the whole extract set;
    the report records which, and the Jaccard overlap of the merge's neurons with training's."""
    cfg = config_from_dict(tiny_config_dict("llama", tmp_path, steps=1))  # one step: extract example 0
    train(cfg)
    one = json.loads((merge(cfg, 1, None, tmp_path / "one", say=lambda _: None) / REPORT).read_text())
    assert one["locate"] == "seed-example" and one["seed_example"]["index"] == 0
    # training's only step located on extract example 0, at the same rate: the same neurons
    assert all(v["mean"] == 1.0 and v["per_layer"] == [1.0] * len(v["per_layer"]) for v in one["training_overlap"].values())
    cfg.merge.locate = "extract-sum"
    summed = json.loads((merge(cfg, 1, None, tmp_path / "sum", say=lambda _: None) / REPORT).read_text())
    assert summed["locate"] == "extract-sum" and summed["seed_example"] is None
    assert all(0 <= v["mean"] <= 1 for v in summed["training_overlap"].values())
    assert summed["modules"]["up"]["layers"][0]["target_index"] != one["modules"]["up"]["layers"][0]["target_index"] \
        or summed["modules"]["down"]["layers"][0]["target_index"] != one["modules"]["down"]["layers"][0]["target_index"]


def test_merge_rate_is_checked_before_models_load(tmp_path):
    from laten_ray.config import ConfigError
    cfg = config_from_dict(tiny_config_dict("qwen2", tmp_path, steps=1))
    with pytest.raises(ConfigError, match=r"merge\.rate: rate must be in \(0, 1\]"):
        merge(cfg, step=None, rate=1.5, out=tmp_path / "x")
    with pytest.raises(ConfigError, match=r"merge\.rate: 0.9 asks for K=43 v neurons"):
        merge(cfg, step=None, rate=0.9, out=tmp_path / "x")
