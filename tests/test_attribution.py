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


def test_precision_stays_inside_attribution_and_keys_the_cache(tmp_path):
    """attribution.precision changes the matmuls of attribution only: the process's own settings
    (here TF32 turned on by the user) are as they were afterwards; float32 is exact whatever the
    process set; bfloat16 projections move scores a little and keep most of the top-K; each
    precision has its own cache entries."""
    from laten_ray.attribution import attribute_each
    from laten_ray.score_cache import ScoreCache
    model, tok = load_model("tiny:llama-target"), load_tokenizer("tiny:llama-target")
    arch, batch = Arch(model), read_examples("demo:extract", limit=4)
    exact = attribute_each(arch, tok, batch)
    torch.set_float32_matmul_precision("high")  # the user's choice, e.g. for their training
    torch.backends.cudnn.allow_tf32 = False
    try:
        for precision in ("float32", "tf32", "bfloat16"):
            got = attribute_each(arch, tok, batch, precision=precision)
            assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 is False
            for a, b in zip(got, exact):
                if precision != "bfloat16":  # no TF32 on a CPU
                    assert torch.equal(a.ffn, b.ffn) and torch.equal(a.attn, b.attn)
                else:
                    assert (a.ffn - b.ffn).abs().max() <= 0.05 * b.ffn.abs().max()
                    top = lambda s: set(s[0].topk(8).indices.tolist())  # noqa: E731
                    assert len(top(a.ffn) & top(b.ffn)) >= 4
    finally:
        torch.set_float32_matmul_precision("highest")
    store = ScoreCache(tmp_path, model)
    keys = {p: store.path(store.key(tok, batch[0], 256, p)) for p in ("float32", "tf32", "bfloat16")}
    assert len(set(keys.values())) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_the_series_kernel_gives_the_exact_scores(family):
    """attribution.kernel: series takes the cumulant series for the (example, neuron) pairs where
    |alpha| x range(P_k) is small and the exact pass for the others; on the tiny models, whose
    pairs fall on both sides, its scores are the exact pass's to float32 rounding (a score is a
    difference of two log-sum-exps of about log V, each rounded at ~1e-6), with the same top
    neurons, for one example and for several."""
    from laten_ray.attribution import SERIES_MIN_BATCH, SERIES_T, attribute_each
    model, tok = load_model(f"tiny:{family}-target"), load_tokenizer(f"tiny:{family}-target")
    arch = Arch(model)
    for n in (1, SERIES_MIN_BATCH + 1):
        batch = read_examples("demo:extract", limit=n)
        exact = attribute_each(arch, tok, batch, kernel="exact")
        series = attribute_each(arch, tok, batch, kernel="series")
        for a, b in zip(series, exact):
            for name in ("ffn", "attn", "layer_attn", "layer_ffn"):
                assert (getattr(a, name) - getattr(b, name)).abs().max() <= 2e-6, name
            for layer in range(arch.shape.n_layers):
                assert set(a.ffn[layer].topk(8).indices.tolist()) == set(b.ffn[layer].topk(8).indices.tolist())
    # on random inputs with activations of every size, both sides of SERIES_T, against float64
    from laten_ray.attribution import neuron_scores
    g = torch.Generator().manual_seed(0)
    V, d, n, B = 4000, 64, 300, 4
    unembed, vectors = torch.randn(V, d, generator=g), torch.randn(d, n, generator=g) * 0.05
    base, r, w = torch.randn(B, d, generator=g), torch.full((B,), 4.0), torch.randint(0, V, (B,), generator=g)
    coef = torch.randn(B, n, generator=g) * torch.logspace(-3, 1, n)  # from tiny to large
    t = (coef / r[:, None]).abs() * (lambda P: P.amax(-1) - P.amin(-1))(vectors.T @ unembed.T)
    assert (t <= SERIES_T).float().mean() > 0.2 and (t > SERIES_T).float().mean() > 0.2
    z = (base.double() @ unembed.double().T) / r.double()[:, None]     # float64 throughout: [B, V]
    proj, a = vectors.double().T @ unembed.double().T, coef.double() / r.double()[:, None]  # [n, V], [B, n]
    truth = a * proj[:, w].T - (torch.logsumexp(z[:, None] + a[..., None] * proj[None], -1)
                                - torch.logsumexp(z, -1, keepdim=True))  # [B, n]
    for kernel in (False, True):
        got = neuron_scores(unembed, vectors, base, coef, r, w, 256 << 20, series=kernel)
        assert (got - truth).abs().max() <= 2e-5 * truth.abs().max(), kernel
