"""Sparse injection through hooks equals editing the weights by hand; gradients reach only the hypernetwork."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from laten_ray.arch import MODULES, Arch
from laten_ray.hypernet import HyperNet
from laten_ray.inject import injected, merge_into
from laten_ray.models import load_model

from helpers import FAMILIES


def mistral_model():
    """Mistral with grouped-query attention and head_dim != hidden / heads, built from a config."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mistral", vocab_size=300, hidden_size=64, intermediate_size=160,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=20, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False)


def models():
    return {f: (lambda f=f: load_model(f"tiny:{f}-target")) for f in FAMILIES} | {"mistral": mistral_model}


def random_edit(arch: Arch, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = arch.shape
    index = {m: torch.stack([torch.randperm(s.neurons(m), generator=g)[:k] for _ in range(s.n_layers)])
             for m in MODULES}                                              # [L, K]
    delta = {m: 0.05 * torch.randn(s.n_layers, k, s.hidden, generator=g) for m in MODULES}  # [L, K, d]
    return index, delta


def edit_by_hand(model, index, delta):
    """W[idx] += delta for up/v rows, W[:, idx] += delta^T for down/o columns."""
    layers = model.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            for m, lin in {"up": layer.mlp.up_proj, "v": layer.self_attn.v_proj}.items():
                for r, row in enumerate(index[m][i].tolist()):
                    lin.weight[row] += delta[m][i, r]
            for m, lin in {"down": layer.mlp.down_proj, "o": layer.self_attn.o_proj}.items():
                for r, col in enumerate(index[m][i].tolist()):
                    lin.weight[:, col] += delta[m][i, r]


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral"])
def test_injected_forward_equals_hand_edited_copy(name):
    model = models()[name]()
    arch = Arch(model)
    index, delta = random_edit(arch)
    ids = torch.randint(0, arch.shape.vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    edited = copy.deepcopy(model)
    edit_by_hand(edited, index, delta)
    before = model(ids).logits
    with injected(arch, index, delta):
        hooked = model(ids).logits
    after = model(ids).logits
    want = edited(ids).logits
    assert (want - before).abs().max() > 1e-3  # the edit matters
    torch.testing.assert_close(hooked, want, atol=1e-5, rtol=1.3e-6)
    assert torch.equal(after, before)  # hooks are gone after the block

    merge_into(arch, index, delta)  # the real edit of merge gives the same weights
    for (n, p), (_, q) in zip(model.named_parameters(), edited.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1.3e-6, msg=lambda m: f"{n}: {m}")


def test_gradients_reach_the_hypernetwork_only():
    model = load_model("tiny:qwen2-target")
    arch = Arch(model)
    s = arch.shape
    index, _ = random_edit(arch)
    hyper = HyperNet(48, s.hidden, MODULES, init_std=0.02)
    slices = {m: torch.randn(s.n_layers, index[m].shape[1], 48) for m in MODULES}  # [L, K, d_s]
    ids = torch.randint(0, s.vocab, (2, 10))
    with injected(arch, index, hyper(slices)):
        loss = model(ids, labels=ids).loss
    loss.backward()
    for name, p in hyper.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.named_parameters():
        assert not p.requires_grad and p.grad is None, name


def test_hooks_touch_only_k_columns_of_the_input():
    """The row hook multiplies by [K, d] and the column hook reads K inputs: no [n, d] delta."""
    model = load_model("tiny:llama-target")
    arch = Arch(model)
    index, delta = random_edit(arch, k=3)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(tuple(b.shape))
        return real(a, b)
    torch.Tensor.__matmul__ = spy
    try:
        with injected(arch, index, delta):
            model(torch.randint(0, arch.shape.vocab, (1, 6)))
    finally:
        torch.Tensor.__matmul__ = real
    d = arch.shape.hidden
    assert seen and all(shape in {(d, 3), (3, d)} for shape in seen), set(seen)
