"""Batched attribution equals the literal per-neuron definition (docs/method.md §1)."""
import pytest
import torch

from laten_ray.arch import Arch
from laten_ray.attribution import attribute
from laten_ray.data import Example, attribution_ids, read_examples
from laten_ray.models import load_model, load_tokenizer
from laten_ray.reference import attribute_per_neuron

from helpers import FAMILIES

LONG = Example(({"role": "system", "content": "You are careful."},
                {"role": "user", "content": "Add 3 and 4, then double it."},
                {"role": "assistant", "content": "3 + 4 = 7 and 7 * 2 = 14. So the answer is 14."}), "long")


@pytest.mark.parametrize("role", ["source", "target"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_per_neuron(family, role):
    spec = f"tiny:{family}-{role}"
    arch, tok = Arch(load_model(spec)), load_tokenizer(spec)
    # rows of different lengths (so padding matters) and a small budget (many chunks)
    examples = read_examples("demo:align", limit=2) + [LONG]
    assert len({len(attribution_ids(tok, e)[0]) for e in examples}) > 1
    fast = attribute(arch, tok, examples, batch_size=2, budget_bytes=1 << 20)
    slow = attribute_per_neuron(arch, tok, examples)
    s = arch.shape
    assert fast.ffn.shape == (s.n_layers, s.ffn) and fast.attn.shape == (s.n_layers, s.attn_width)
    for name, want in slow.tensors().items():
        got = fast.tensors()[name]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")
    assert fast.ffn.abs().max() > 1e-3  # scores are not trivially zero
    assert fast.n_examples == 3


def test_scores_add_over_examples():
    arch, tok = Arch(load_model("tiny:qwen2-source")), load_tokenizer("tiny:qwen2-source")
    a, b = read_examples("demo:extract", limit=2)
    both = attribute(arch, tok, [a, b])
    apart = attribute(arch, tok, [a], group=1) + attribute(arch, tok, [b], group=1)
    for name, t in both.tensors().items():
        torch.testing.assert_close(t, apart.tensors()[name], atol=1e-5, rtol=1.3e-6, msg=lambda m: f"{name}: {m}")


def test_v_rows_sum_their_query_group():
    arch = Arch(load_model("tiny:qwen2-source"))  # 8 query heads share 2 KV heads, head_dim 16
    s = arch.shape
    scores = attribute(arch, load_tokenizer("tiny:qwen2-source"), read_examples("demo:extract", limit=1))
    v = scores.v_rows(s.n_kv_heads, s.head_dim)
    assert v.shape == (s.n_layers, s.kv_width)
    group = s.n_heads // s.n_kv_heads
    for kv in range(s.n_kv_heads):
        for i in range(s.head_dim):
            cols = [h * s.head_dim + i for h in range(kv * group, (kv + 1) * group)]
            torch.testing.assert_close(v[:, kv * s.head_dim + i], scores.attn[:, cols].sum(1))
