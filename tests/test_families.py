"""Every family of laten_ray/families.yaml on its tiny pair (builtin/tiny.py, built from a config
of that family in transformers and loaded from an HF folder): attribution equals the independent
reference, the read-out is the model's own, injection equals a hand edit of the HF weights,
two training steps and a merge that plain transformers and vLLM load and compute alike, tied
embeddings still tied. Llama 2 and Qwen2 have the same checks in test_attribution.py,
test_inject.py and test_merge.py."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from laten_ray.arch import MODULES, Arch
from laten_ray.attribution import Captured, attribute, capture
from laten_ray.config import ConfigError, config_from_dict
from laten_ray.data import attribution_batch, read_examples
from laten_ray.inject import injected, merge_into
from laten_ray.models import load_model, load_tokenizer
from laten_ray.reference import attribute_per_neuron

from helpers import tiny_config_dict
from test_attribution import LONG

FAMILIES = ["llama3", "mistral", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "smollm3"]
REPO = Path(__file__).resolve().parents[1]

# Where each transferred module's rows (up, v) or columns (down, o) are in the HF weights, written
# from the HF modeling code and independent of families.yaml: (weight path in a layer, first row).
LLAMA_LAYOUT = {"up": ("mlp.up_proj", 0), "v": ("self_attn.v_proj", 0),
                "down": ("mlp.down_proj", 0), "o": ("self_attn.o_proj", 0)}
PHI3_LAYOUT = {"up": ("mlp.gate_up_proj", lambda c: c.intermediate_size),  # gate, then up
               "v": ("self_attn.qkv_proj", lambda c: (c.num_attention_heads + c.num_key_value_heads)
                     * (c.hidden_size // c.num_attention_heads)),  # Phi3Attention's head_dim
               "down": ("mlp.down_proj", 0), "o": ("self_attn.o_proj", 0)}


def layout(config) -> dict[str, tuple[str, int]]:
    table = PHI3_LAYOUT if config.model_type == "phi3" else LLAMA_LAYOUT
    return {m: (path, first(config) if callable(first) else first) for m, (path, first) in table.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_equals_the_reference_and_reads_out_the_models_own_probability(family):
    """The fast path (family entry) against the reference (the model's own modules), for the
    source and the target; and the read-out of the final residual, log P(w | x_T) with r frozen at
    x_T's own RMS, is exactly the model's log-probability of w (norm gain, soft cap)."""
    examples = read_examples("demo:align", limit=2) + [LONG]
    for role in ("source", "target"):
        spec = f"tiny:{family}-{role}"
        arch, tok = Arch(load_model(spec)), load_tokenizer(spec)
        fast = attribute(arch, tok, examples, batch_size=2, budget_bytes=1 << 20)
        slow = attribute_per_neuron(arch, tok, examples)
        for name, want in slow.tensors().items():
            torch.testing.assert_close(fast.tensors()[name], want, atol=1e-4, rtol=0,
                                       msg=lambda m: f"{spec} {name}: {m}")
        assert fast.ffn.abs().max() > 1e-3 and fast.attn.abs().max() > 1e-3, spec

        batch = attribution_batch(tok, examples)
        cap: Captured = capture(arch, batch)
        resid = cap.resid_pre[:, -1] + cap.attn_out[:, -1] + cap.mlp_out[:, -1]  # [B, d]: the last layer's output
        from laten_ray.attribution import log_prob
        unembed = arch.lm_head().weight.float() * arch.norm_gain(arch.final_norm())
        ours = log_prob(unembed, resid, cap.rms_final, cap.token, arch.shape.logit_softcap)  # [B]
        with torch.no_grad():
            logits = arch.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = torch.arange(len(examples))
        theirs = torch.log_softmax(logits[rows, batch["last"]].float(), -1)[rows, batch["target"]]
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0, msg=lambda m: f"{spec} read-out: {m}")


@pytest.mark.parametrize("wrong", ["norm_offset", "logit_softcap", "post_norms"])
def test_a_wrong_family_entry_is_caught_by_the_reference(wrong, monkeypatch):
    """The reference does not read the family entry: Gemma 2 described without its (1 + g)
    norms, its soft cap or its post-norms gives scores that differ from it."""
    import laten_ray.arch as arch_mod
    model, tok = load_model("tiny:gemma2-target"), load_tokenizer("tiny:gemma2-target")
    examples = read_examples("demo:align", limit=2)
    slow = attribute_per_neuron(Arch(model), tok, examples)
    gemma = arch_mod.FAMILIES["gemma2"]
    bad = {"norm_offset": replace(gemma, norm_offset=0.0), "logit_softcap": replace(gemma, logit_softcap=None),
           "post_norms": replace(gemma, attn_post_norm=None, mlp_post_norm=None)}[wrong]
    monkeypatch.setitem(arch_mod.BY_MODEL_TYPE, "gemma2", bad)
    fast = attribute(Arch(model), tok, examples)
    worst = max(float((fast.tensors()[n] - t).abs().max()) for n, t in slow.tensors().items())
    assert worst > 1e-3, worst


@pytest.mark.parametrize("family", FAMILIES)
def test_injection_and_merge_equal_a_hand_edit_of_the_hf_weights(family):
    """Rows of up/v and columns of down/o edited through hooks, through merge_into, and by hand
    at the places the HF modeling code reads them (Phi-3: row ranges of qkv_proj and
    gate_up_proj) give the same logits and the same weights."""
    import copy
    model = load_model(f"tiny:{family}-target")
    arch, s = Arch(model), Arch(model).shape
    g = torch.Generator().manual_seed(0)
    index = {m: torch.stack([torch.randperm(s.neurons(m), generator=g)[:5] for _ in range(s.n_layers)])
             for m in MODULES}                                              # [L, K]
    delta = {m: 0.05 * torch.randn(s.n_layers, 5, s.hidden, generator=g) for m in MODULES}  # [L, K, d]
    edited = copy.deepcopy(model)
    with torch.no_grad():
        for m, (path, first) in layout(model.config).items():
            for i in range(s.n_layers):
                w = edited.get_submodule(f"{arch.family.layers}.{i}.{path}").weight
                for r, n in enumerate(index[m][i].tolist()):
                    if m in ("up", "v"):
                        w[first + n] += delta[m][i, r]
                    else:
                        w[:, first + n] += delta[m][i, r]
    ids = torch.randint(3, s.vocab, (2, 12), generator=g)
    with torch.no_grad():
        want, before = edited(ids).logits, model(ids).logits
        with injected(arch, index, delta):
            hooked = model(ids).logits
    assert (want - before).abs().max() > 1e-3
    torch.testing.assert_close(hooked, want, atol=1e-5, rtol=1.3e-6)
    # training's loss (answer_loss: the decoder, then lm_head and the soft cap on labelled
    # positions only) is the model's own cross-entropy
    from laten_ray.data import lm_batch
    from laten_ray.train import answer_loss
    batch = lm_batch(load_tokenizer(f"tiny:{family}-target"), read_examples("demo:align", limit=3), 128)
    n = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        ours = answer_loss(arch, batch, n)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    merge_into(arch, index, delta)
    for (n, p), (_, q) in zip(model.named_parameters(), edited.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1.3e-6, msg=lambda msg: f"{n}: {msg}")


@pytest.fixture(scope="module")
def merged_folders(tmp_path_factory):
    """family -> (run config, the folder of a merge after 2 training steps): built once per family."""
    from laten_ray.merge import merge
    from laten_ray.train import train
    made = {}

    def make(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            cfg = config_from_dict(tiny_config_dict(family, root / "runs", steps=2))
            train(cfg)
            made[family] = cfg, merge(cfg, step=2, rate=0.2, out=root / "merged", say=lambda _: None)
        return made[family]
    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_then_a_merge_that_transformers_loads(family, merged_folders):
    """Training runs two steps, the merge changes only its rows and columns
    of the weights that hold them, the merged folder loads in plain transformers and generates,
    and a tied embedding stays one tensor, saved once."""
    cfg, out = merged_folders(family)
    target = load_model(cfg.target.model)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    report = json.loads((out / "laten_merge.json").read_text())
    places = layout(target.config)
    changed = set()
    for (name, p), (_, q) in zip(merged.named_parameters(), target.named_parameters()):
        if not torch.equal(p, q):
            changed.add(name)
    layers = Arch(target).family.layers
    for m, (path, first) in places.items():
        axis = 0 if m in ("up", "v") else 1
        for entry in report["modules"][m]["layers"]:
            i = entry["target_layer"]
            name = f"{layers}.{i}.{path}.weight"
            moved = ((merged.get_parameter(name) - target.get_parameter(name)).abs().sum(1 - axis) > 0).nonzero()
            assert set(moved.flatten().tolist()) == {first + n for n in entry["target_index"]}, (m, i)
    assert changed == {f"{layers}.{i}.{path}.weight" for i in range(Arch(target).shape.n_layers)
                       for path, _ in places.values()}
    ids = torch.tensor([[1, 40, 41, 42]])
    new = merged.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert new.shape == (1, 8)
    if target.config.tie_word_embeddings:
        assert merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
        with safe_open(out / "model.safetensors", framework="pt") as f:
            stored = [k for k in f.keys() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
        assert len(stored) == 1, stored


@pytest.mark.slow  # over 10 s on 2 cores
@pytest.mark.vllm
def test_vllm_loads_every_familys_merge_and_computes_what_transformers_does(merged_folders):
    """Each merged folder in vLLM (CPU, one process for all: tests/vllm_logprobs.py): the prompt's
    token log-probabilities equal transformers' to 1e-3."""
    pytest.importorskip("vllm")
    folders = {f: merged_folders(f)[1] for f in FAMILIES}
    ids = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(REPO)}
    got = subprocess.run([sys.executable, str(REPO / "tests" / "vllm_logprobs.py"), json.dumps(ids),
                          *map(str, folders.values())], capture_output=True, text=True, env=env, timeout=600)
    assert got.returncode == 0, got.stderr[-3000:]
    logprobs = json.loads(got.stdout.strip().splitlines()[-1])
    for family, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)  # [T-1, V]
        want = want.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logprobs[str(folder)]), want, atol=1e-3, rtol=0,
                                   msg=lambda m: f"{family}: {m}")


def test_a_pair_across_families_is_refused_unless_the_config_allows_it(tmp_path):
    from laten_ray.checks import checked_from_dict
    tree = tiny_config_dict("qwen3", tmp_path)
    tree["target"]["model"] = "tiny:llama3-target"
    with pytest.raises(ConfigError, match=r"target.model: a llama model, but the source is a qwen3 model; .*"
                                          r"transfer.cross_family: true"):
        checked_from_dict(tree)
    tree["transfer"]["cross_family"] = True
    assert checked_from_dict(tree).transfer.cross_family is True
