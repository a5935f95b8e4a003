"""The "Seeking Neural Nuggets" baseline (laten_ray/seeking.py): sensitivity as autograd defines it,
memory-bounded; windows as brute force finds them; a LoRA start that is the target itself."""
import json

import pytest
import torch

from laten_ray.arch import Arch
from laten_ray.data import lm_batch, read_examples
from laten_ray.models import load_model, load_tokenizer
from laten_ray.seeking import MATRICES, best_window, extract, init_lora, select_layers, sensitivity

from helpers import FAMILIES

MAX_LENGTH = 128


def setup(family: str):
    src = load_model(f"tiny:{family}-source")
    return src, load_tokenizer(f"tiny:{family}-source"), read_examples("demo:align", limit=3)


def plain_sensitivity(model, tok, examples) -> dict:
    """The definition, as the released code computes it: every parameter trainable, the model's
    own loss on the answer labels, one backward per example, |W * W.grad| summed."""
    arch = Arch(model)
    weights = {(i, m): arch.weight(i, m) for i in range(arch.shape.n_layers) for m in MATRICES}
    S = {k: torch.zeros_like(w) for k, w in weights.items()}
    model.requires_grad_(True)
    for example in examples:
        model.zero_grad(set_to_none=True)
        model(**lm_batch(tok, [example], MAX_LENGTH)).loss.backward()  # mean over answer tokens
        for k, w in weights.items():
            S[k] += (w * w.grad).abs().detach()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return S


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_equals_autograd(family):
    src, tok, examples = setup(family)
    arch = Arch(src)
    # one matrix by hand: plain loss.backward() per example, |W * W.grad| summed
    w = arch.weight(2, "down")  # [d, ffn]
    w.requires_grad_(True)
    want = torch.zeros_like(w)
    for example in examples:
        w.grad = None
        src(**lm_batch(tok, [example], MAX_LENGTH)).loss.backward()
        want += (w * w.grad).abs()
    w.grad = None
    w.requires_grad_(False)
    totals, acc = sensitivity(src, tok, examples, MAX_LENGTH)
    torch.testing.assert_close(acc[(2, "down")], want, rtol=1e-5, atol=1e-10)
    assert want.sum() > 0
    # per-matrix and per-layer totals against the plain path
    plain = plain_sensitivity(src, tok, examples)
    want_totals = torch.tensor([[float(plain[(i, m)].double().sum()) for m in MATRICES]
                                for i in range(arch.shape.n_layers)], dtype=torch.float64)  # [L, 7]
    torch.testing.assert_close(totals, want_totals, rtol=1e-5, atol=0)
    torch.testing.assert_close(totals.sum(1), want_totals.sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_bounded_path_equals_plain_path(family, checkpointing):
    src, tok, examples = setup(family)
    arch = Arch(src)
    plain = plain_sensitivity(src, tok, examples)
    weights = [arch.weight(i, m) for i in range(arch.shape.n_layers) for m in MATRICES]
    live = []  # how many of the seven matrices' gradients exist whenever one arrives
    probes = []
    for w in weights:  # runs before sensitivity's own hook, registered later
        w.requires_grad_(True)  # hooks can only be registered on such tensors; they stay after
        probes.append(w.register_post_accumulate_grad_hook(
            lambda _: live.append(sum(v.grad is not None for v in weights))))
        w.requires_grad_(False)
    try:
        totals, acc = sensitivity(src, tok, examples, MAX_LENGTH, gradient_checkpointing=checkpointing)
        layers = [1, 4]  # a second pass's subset: only those layers are backpropagated into
        sub_totals, sub = sensitivity(src, tok, examples, MAX_LENGTH, layers=layers,
                                      gradient_checkpointing=checkpointing)
        _, none = sensitivity(src, tok, examples, MAX_LENGTH, full=False)
    finally:
        for h in probes:
            h.remove()
    assert live and max(live) == 1  # one gradient at a time
    for key, want in plain.items():
        assert acc[key].dtype == torch.float32
        torch.testing.assert_close(acc[key], want, rtol=1e-5, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")
    assert set(sub) == {(i, m) for i in layers for m in MATRICES} and none == {}
    for key in sub:
        torch.testing.assert_close(sub[key], acc[key], rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(sub_totals[layers], totals[layers], rtol=1e-6, atol=0)
    assert sub_totals[[0, 2, 3, 5]].abs().sum() == 0
    # the model is left as it was: frozen, eval, no gradients, no checkpointing
    assert not any(p.requires_grad or p.grad is not None for p in src.parameters())
    assert not src.training and not src.is_gradient_checkpointing


def test_checkpointing_refuses_dropout():
    src, tok, examples = setup("llama")
    Arch(src).part(0, "attn").attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        sensitivity(src, tok, examples[:1], MAX_LENGTH, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in src.parameters())


def brute_window(S: torch.Tensor, h: int, w: int) -> tuple[int, int]:
    R, C = S.shape
    h, w = min(h, R), min(w, C)
    best, where = None, None
    for r in range(R - h + 1):
        for c in range(C - w + 1):
            s = float(S[r:r + h, c:c + w].double().sum())
            if best is None or s > best:  # strict: the first maximum in row-major order stays
                best, where = s, (r, c)
    return where


# (R, C, h, w): general, whole matrix, 1x1, tall, wide, source smaller along rows / cols / both
SHAPES = [(9, 7, 4, 3), (6, 5, 6, 5), (8, 9, 1, 1), (30, 4, 7, 3), (4, 30, 3, 7),
          (3, 10, 5, 4), (10, 3, 4, 6), (2, 2, 5, 5), (16, 16, 16, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_best_window_equals_brute_force(shape):
    R, C, h, w = shape
    gen = torch.Generator().manual_seed(R * 100 + C)
    for trial in range(4):
        S = torch.rand(R, C, generator=gen)  # [R, C]
        assert best_window(S, h, w) == brute_window(S, h, w)
        ties = torch.randint(0, 3, (R, C), generator=gen).float()  # exact sums, many ties
        assert best_window(ties, h, w) == brute_window(ties, h, w)
    assert best_window(torch.zeros(R, C), h, w) == (0, 0)  # all tied: the first
    if h < R and w < C:
        S = torch.zeros(R, C)
        S[R - 1, C - 1] = 1.0
        assert best_window(S, h, w) == (R - h, C - w)


def test_select_layers():
    assert select_layers(torch.tensor([1.0, 5.0, 3.0, 5.0, 0.5]), 3) == [1, 2, 3]
    assert select_layers(torch.tensor([2.0, 2.0, 2.0]), 2) == [0, 1]  # ties: the shallower


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_plan(family):
    src, tok, examples = setup(family)
    target = load_model(f"tiny:{family}-target")
    plan = extract(src, tok, target, examples, rank=8, max_length=MAX_LENGTH)
    one = extract(src, tok, target.config, examples, rank=8, max_length=MAX_LENGTH, passes=1,
                  gradient_checkpointing=True)
    t = Arch(target)
    L_s, L_t = Arch(src).shape.n_layers, t.shape.n_layers
    assert len(plan.layer_totals) == L_s and len(plan.chosen) == L_t
    assert plan.chosen == select_layers(torch.tensor(plan.layer_totals), L_t)
    assert plan.chosen == sorted(plan.chosen)
    assert len(plan.pieces) == L_t * len(MATRICES)
    for p in plan.pieces:
        assert p.source_layer == plan.chosen[p.layer]
        assert p.target_shape == tuple(t.weight(p.layer, p.module).shape)
        assert p.B.shape == (p.target_shape[0], 8) and p.A.shape == (8, p.target_shape[1])
        assert 0 < p.energy <= 1 and 0 < p.captured <= 1
        q = one.piece(p.layer, p.module)  # one pass (and checkpointing): the same plan
        assert (q.source_layer, q.row0, q.col0) == (p.source_layer, p.row0, p.col0)
        torch.testing.assert_close(q.B @ q.A, p.B @ p.A, rtol=1e-4, atol=1e-5)
    data = json.loads(json.dumps(plan.to_json()))  # plain data only
    assert data["chosen"] == plan.chosen and len(data["pieces"]) == len(plan.pieces)
    assert "B" not in data["pieces"][0] and set(data["module_totals"]) == set(MATRICES)
    if family == "qwen2":  # source k/v have 2 x 16 rows, the target's 2 x 24: zero-padded block
        k = plan.piece(0, "k")
        assert k.source_shape == (32, 128) and k.target_shape == (48, 64) and k.block == (32, 64)
        assert k.row0 == 0 and k.B[32:].abs().sum() == 0 and k.B[:32].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_start_equals_target(family):
    from peft import LoraConfig, get_peft_model

    src, tok, examples = setup(family)
    target = load_model(f"tiny:{family}-target")
    plan = extract(src, tok, target, examples, rank=16, max_length=MAX_LENGTH)
    wrapped = load_model(f"tiny:{family}-target")
    peft_model = get_peft_model(wrapped, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     lora_dropout=0.0))
    done = init_lora(peft_model, plan)
    assert len(done) == len(plan.pieces)
    batch = lm_batch(tok, read_examples("demo:align", limit=4), MAX_LENGTH)
    with torch.no_grad():
        want = target(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # float32 rounding of W - BA + BA
    arch = Arch(peft_model.get_base_model())
    for p in plan.pieces:  # the LoRA carries the source's block, not zero
        layer = arch.part(p.layer, p.module)
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(delta, p.B @ p.A, rtol=1e-5, atol=1e-6)
        assert delta.norm() > 0.1
    merged = Arch(peft_model.merge_and_unload())  # before any training: the target again
    for i in range(t_layers := Arch(target).shape.n_layers):
        for m in MATRICES:
            torch.testing.assert_close(merged.weight(i, m), Arch(target).weight(i, m), rtol=0, atol=1e-6)
    assert t_layers == len(plan.chosen)


def test_lora_modules_without_plan_keep_default():
    from peft import LoraConfig, get_peft_model

    src, tok, examples = setup("qwen2")
    target = load_model("tiny:qwen2-target")
    plan = extract(src, tok, target, examples, rank=4, max_length=MAX_LENGTH)
    plan.pieces = [p for p in plan.pieces if p.layer != 1]  # layer 1: no pieces
    peft_model = get_peft_model(load_model("tiny:qwen2-target"),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                           lora_dropout=0.0))
    done = init_lora(peft_model, plan)
    assert sorted(done) == sorted((p.layer, p.module) for p in plan.pieces if p.module in ("q", "down"))
    arch = Arch(peft_model.get_base_model())
    assert arch.part(1, "q").lora_B["default"].weight.abs().sum() == 0  # peft's init: adds nothing
    assert arch.part(0, "q").lora_B["default"].weight[:, 4:].abs().sum() == 0  # beyond the plan's rank
    assert arch.part(0, "q").lora_A["default"].weight[4:].abs().sum() > 0      # still trainable
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, target(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
