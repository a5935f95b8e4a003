"""`laten analyze` (docs/method.md §11): CKA against direct formulas, the heatmaps against a slow
reference from stored activations, parametric cosines against closed forms, neuron overlap,
and the command on a real study, in this process and on Ray."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from laten_ray.analysis.cka import CKA, alignment_fit, linear_cka, pieces, u_center
from laten_ray.analysis.neurons import chance, delta_shares, mean_jaccard, stability
from laten_ray.analysis.parametric import compare
from laten_ray.analysis.report import Inputs, Settings, analyze, cka_figure, in_turn, write
from laten_ray.analysis.side import Side
from laten_ray.arch import MODULES, Arch
from laten_ray.attribution import Scores
from laten_ray.data import lm_ids, read_examples
from laten_ray.hooks import Hooks
from laten_ray.models import load_model, load_tokenizer, resolve

from helpers import FAMILIES

REPO = Path(__file__).resolve().parents[1]
f64 = torch.float64


def hsic_centred(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The biased HSIC of Gretton et al.: tr(K H L H), H = I - 11^T/n."""
    n = k.shape[0]
    h = torch.eye(n, dtype=f64) - torch.full((n, n), 1 / n, dtype=f64)
    return torch.trace(k @ h @ l @ h)


def hsic_song(k: torch.Tensor, l: torch.Tensor) -> float:
    """The unbiased HSIC_1 of Song et al. 2012, as printed: with K~, L~ the Grams with zeroed
    diagonals, [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    k, l = k.double().clone(), l.double().clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, dtype=f64)
    return float((torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def grams_of(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """U-centred Grams of one layer's pieces, each as a 1-layer stack [1, b, b]."""
    return [u_center(p @ p.T)[None] for p in x.split(sizes)]


# --- CKA ----------------------------------------------------------------------------------------

def test_linear_cka_equals_the_direct_formula():
    torch.manual_seed(0)
    x, y = torch.randn(50, 7, dtype=f64), torch.randn(50, 5, dtype=f64) + 3  # an offset: centring matters
    y[:, 0] += 2 * x[:, 0]
    k, l = x @ x.T, y @ y.T
    direct = hsic_centred(k, l) / torch.sqrt(hsic_centred(k, k) * hsic_centred(l, l))
    assert linear_cka(x, y) == pytest.approx(float(direct), abs=1e-12)
    assert 0.1 < linear_cka(x, y) < 1


def test_u_centred_grams_give_the_unbiased_hsic_of_song_et_al():
    torch.manual_seed(1)
    for n in (4, 9, 30):
        x, y = torch.randn(n, 6, dtype=f64), torch.randn(n, 3, dtype=f64)
        k, l = x @ x.T, y @ y.T
        assert float((u_center(k) * u_center(l)).sum()) / (n * (n - 3)) == pytest.approx(hsic_song(k, l), abs=1e-10)


def test_cka_is_one_under_an_orthogonal_map():
    torch.manual_seed(2)
    x = torch.randn(300, 16, dtype=f64)
    w, _ = torch.linalg.qr(torch.randn(16, 16, dtype=f64))  # orthogonal
    assert linear_cka(x, x @ w) == pytest.approx(1.0, abs=1e-12)
    acc = CKA(1, 1, modules=("m",))
    sizes = pieces(300, 64)
    acc.add({"m": grams_of(x, sizes)}, {"m": grams_of(3 * x @ w, sizes)})  # and any isotropic scale
    assert float(acc.values()["m"]) == pytest.approx(1.0, abs=1e-12)


def test_cka_of_independent_features_is_near_zero():
    """For n independent isotropic Gaussian rows of widths d_x and d_y: the full-sample (biased)
    CKA has expectation about sqrt(d_x d_y / ((n + d_x)(n + d_y))) (0.027 here; spread 3% of it
    over 20 draws), and the unbiased estimator has mean 0 and standard deviation about sqrt(2)/n
    for one piece of n tokens, sqrt(2)/(b sqrt(P)) for P pieces of b tokens. The bounds are 5 and
    6 of those spreads."""
    torch.manual_seed(3)
    n, dx, dy = 2000, 64, 48
    x, y = torch.randn(n, dx, dtype=f64), torch.randn(n, dy, dtype=f64)
    expected = math.sqrt(dx * dy / ((n + dx) * (n + dy)))
    assert abs(linear_cka(x, y) - expected) < 0.15 * expected
    for b in (n, 250):
        sizes = pieces(n, b)
        acc = CKA(1, 1, modules=("m",))
        acc.add({"m": grams_of(x, sizes)}, {"m": grams_of(y, sizes)})
        assert abs(float(acc.values()["m"])) < 6 * math.sqrt(2) / (b * math.sqrt(len(sizes)))


def test_incremental_accumulation_equals_all_at_once():
    """Pieces added batch by batch, in any grouping, give the CKA computed at once from every
    piece with Song et al.'s formula (HSIC_1 weighted by b(b-3) token pairs); one piece of all
    tokens is the debiased full-sample CKA."""
    torch.manual_seed(4)
    n = 230
    xs = [torch.randn(n, 12, dtype=f64) for _ in range(3)]                    # target layers
    ys = [xs[0] @ torch.randn(12, 20, dtype=f64) + torch.randn(n, 20, dtype=f64),
          torch.randn(n, 8, dtype=f64)]                                        # source layers
    sizes = pieces(n, 40)
    stack = lambda layers, i: torch.stack([u_center(l.split(sizes)[i] @ l.split(sizes)[i].T) for l in layers])
    one = CKA(3, 2, modules=("m",))
    one.add({"m": [stack(xs, i) for i in range(len(sizes))]}, {"m": [stack(ys, i) for i in range(len(sizes))]})
    apart = CKA(3, 2, modules=("m",))
    for group in ([0, 1], [2], [3, 4, 5]):
        apart.add({"m": [stack(xs, i) for i in group]}, {"m": [stack(ys, i) for i in group]})
    torch.testing.assert_close(apart.values()["m"], one.values()["m"], atol=1e-12, rtol=0)
    assert apart.tokens == n and apart.pieces == len(sizes) == 6

    def direct(a, b):
        ps = list(zip(a.split(sizes), b.split(sizes)))
        num = sum(hsic_song(p @ p.T, q @ q.T) * len(p) * (len(p) - 3) for p, q in ps)
        sa = sum(hsic_song(p @ p.T, p @ p.T) * len(p) * (len(p) - 3) for p, _ in ps)
        sb = sum(hsic_song(q @ q.T, q @ q.T) * len(q) * (len(q) - 3) for _, q in ps)
        return num / math.sqrt(sa * sb)
    want = torch.tensor([[direct(x, y) for y in ys] for x in xs], dtype=f64)
    torch.testing.assert_close(one.values()["m"], want, atol=1e-10, rtol=0)
    assert want[0, 0] > 0.5 and abs(want[1, 1]) < 0.2

    whole = CKA(1, 1, modules=("m",))
    whole.add({"m": [u_center(xs[0] @ xs[0].T)[None]]}, {"m": [u_center(ys[0] @ ys[0].T)[None]]})
    g, h = xs[0] @ xs[0].T, ys[0] @ ys[0].T
    assert float(whole.values()["m"]) == pytest.approx(hsic_song(g, h) / math.sqrt(hsic_song(g, g) * hsic_song(h, h)))


def test_pieces_cover_the_tokens_with_at_least_four_each():
    assert pieces(3, 8) == []
    for n in (4, 9, 257, 1000):
        sizes = pieces(n, 256)
        assert sum(sizes) == n and max(sizes) <= 256 and min(sizes) >= 4 and max(sizes) - min(sizes) <= 1


def test_alignment_fit():
    cka = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.2, 0.8]], dtype=f64)
    fit = alignment_fit(cka, torch.tensor([0, 1]))
    assert fit == {"aligned_mean": pytest.approx(0.55), "best_mean": pytest.approx(0.85),
                   "aligned_is_best": 0.5, "aligned_rank_mean": 2.0}


# --- the heatmaps on two tiny models ------------------------------------------------------------

def stored_activations(spec: str, examples, max_length: int) -> dict:
    """The slow way: every module output of every layer at every answer token, one example at
    a time, kept whole: {module: [L tensors [n, width]]}."""
    model, tok = load_model(spec), load_tokenizer(spec)
    arch = Arch(model)
    got = {m: [[] for _ in range(arch.shape.n_layers)] for m in MODULES}
    for e in examples:
        ids, labels = lm_ids(tok, e, max_length)
        answer = torch.tensor(labels) != -100
        with Hooks() as hooks:
            for i in range(arch.shape.n_layers):
                for m in MODULES:
                    hooks.on_output(arch.part(i, m), lambda _x, out, m=m, i=i: got[m][i].append(out[0, answer].double()))
            model(input_ids=torch.tensor([ids]))
    return {m: [torch.cat(rows) for rows in layers] for m, layers in got.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_heatmaps_equal_a_slow_reference_and_the_files_open(family, tmp_path):
    import matplotlib.image

    examples = read_examples("demo:align", limit=11)
    settings = Settings(max_length=128, batch_size=4, gram_tokens=40, chunk_mb=16, rate=0.25)
    specs = {r: f"tiny:{family}-{r}" for r in ("target", "source")}
    sides = {r: Side(s) for r, s in specs.items()}
    inputs = Inputs(specs["source"], specs["target"], "demo:align", 11, "demo:extract", 3)
    results = analyze(inputs, settings, (sides["target"].shape, sides["source"].shape), in_turn(sides), log=lambda _: None)

    # the reference: all activations held, cut into the same minibatches (batches of 4 examples,
    # pieces of at most 40 tokens) and put through Song et al.'s formula pair by pair
    acts = {r: stored_activations(s, examples, 128) for r, s in specs.items()}
    per_example = [sum(1 for v in lm_ids(sides["target"].tokenizer, e, 128)[1] if v != -100) for e in examples]
    batches = [sum(per_example[i:i + 4]) for i in range(0, 11, 4)]
    sizes = [s for b in batches for s in pieces(b, 40)]
    assert results["data"]["answer_tokens"] == sum(per_example) and results["data"]["pieces"] == len(sizes) > 3
    for m in MODULES:
        def sums(a, b):
            return sum(hsic_song(p @ p.T, q @ q.T) * len(p) * (len(p) - 3) for p, q in zip(a.split(sizes), b.split(sizes)))
        t, s = acts["target"][m], acts["source"][m]
        want = torch.tensor([[sums(x, y) / math.sqrt(sums(x, x) * sums(y, y)) for y in s] for x in t], dtype=f64)
        got = torch.tensor(results["representation"]["modules"][m]["cka"], dtype=f64)
        assert got.shape == (sides["target"].shape.n_layers, sides["source"].shape.n_layers)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=lambda msg: f"{m}: {msg}")
        assert results["representation"]["modules"][m]["mean"] == pytest.approx(float(want.mean()), abs=2e-5)
        assert len(results["representation"]["modules"][m]["aligned_layers"]) == sides["target"].shape.n_layers

    fig = cka_figure(results)
    heatmaps = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == len(MODULES) and len(fig.axes) == 2 * len(MODULES)
    assert [ax.get_title().split(":")[0] for ax in heatmaps] == [f"{m}_proj output" for m in MODULES]
    write(results, tmp_path)
    for name in ("cka.png", "neurons.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 800
    assert not (tmp_path / "parametric.png").exists()  # nothing merged was given
    assert json.loads((tmp_path / "analysis.json").read_text())["representation"]["modules"]["up"]["cka"] == \
        results["representation"]["modules"]["up"]["cka"]
    assert "![CKA](cka.png)" in (tmp_path / "analysis.md").read_text()


def test_grams_need_the_same_tokens():
    sides = {"target": Side("tiny:llama-target"), "source": Side("tiny:llama-source")}
    real = in_turn(sides)

    def other_tokens(calls):
        out = real(calls)
        if calls[0][1] == "grams":
            out[1] = {**out[1], "tokens": "something else"}
        return out
    with pytest.raises(ValueError, match="tokenize the answers differently"):
        analyze(Inputs("tiny:llama-source", "tiny:llama-target", "demo:align", 2), Settings(max_length=64),
                (sides["target"].shape, sides["source"].shape), other_tokens, log=lambda _: None)


# --- parametric ---------------------------------------------------------------------------------

def edited_copy(tmp_path: Path, edits: dict, report: dict | None) -> tuple[Path, Path]:
    """(target folder, a copy of it with `edits` {weight name: new tensor} and laten_merge.json)."""
    target = resolve("tiny:llama-target")
    merged = tmp_path / "merged"
    shutil.copytree(target, merged)
    weights = load_file(merged / "model.safetensors")
    weights.update(edits)
    save_file(weights, merged / "model.safetensors", metadata={"format": "pt"})
    if report:
        (merged / "laten_merge.json").write_text(json.dumps(report))
    return target, merged


def split_delta(w0: torch.Tensor, a: float, b: float, seed: int) -> torch.Tensor:
    """a W0 + b E with E orthogonal to W0 (Frobenius): cos(delta, W0) = a|W0| / |delta|."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(w0.shape, generator=g, dtype=f64)
    e = r - (r * w0).sum() / (w0 * w0).sum() * w0
    return a * w0 + b * e


def closed_form(w0: torch.Tensor, a: float, b: float, seed: int) -> dict:
    e = split_delta(w0, 0, 1, seed)
    w2, e2 = float((w0 * w0).sum()), float((e * e).sum())
    d = math.sqrt(a * a * w2 + b * b * e2)
    m = math.sqrt((1 + a) ** 2 * w2 + b * b * e2)
    return {"cos_target": a * math.sqrt(w2) / d, "cos_merged": (a * (1 + a) * w2 + b * b * e2) / (d * m),
            "delta_norm": d, "relative_norm": d / math.sqrt(w2)}


def test_parametric_numbers_of_a_laten_merge_equal_closed_forms(tmp_path):
    target = load_file(resolve("tiny:llama-target") / "model.safetensors")
    up, down = "model.layers.1.mlp.up_proj.weight", "model.layers.2.mlp.down_proj.weight"
    rows, cols = [5, 0, 17], [3, 9]
    w_up, w_down = target[up].double()[rows], target[down].double()[:, cols]
    new_up, new_down = target[up].double().clone(), target[down].double().clone()
    new_up[rows] += split_delta(w_up, 0.3, 0.05, 0)
    new_down[:, cols] += split_delta(w_down, -0.1, 0.2, 1)
    report = {"rate": 0.5, "modules": {
        "up": {"neurons_per_layer": 3, "layers": [{"target_layer": 1, "target_index": rows, "delta_norm": 3.0}]},
        "down": {"neurons_per_layer": 2, "layers": [{"target_layer": 2, "target_index": cols, "delta_norm": 0.0},
                                                    {"target_layer": 0, "target_index": cols, "delta_norm": 4.0}]}}}
    folder, merged = edited_copy(tmp_path, {up: new_up.float(), down: new_down.float()}, report)
    got = compare(folder, merged)
    assert got["kind"] == "laten" and got["rate"] == 0.5
    # float32 storage of W0 + delta rounds the delta by ~1e-7 of W
    for key, want in closed_form(w_up, 0.3, 0.05, 0).items():
        assert got["modules"]["up"][0][key] == pytest.approx(want, rel=1e-4), key
    for key, want in closed_form(w_down, -0.1, 0.2, 1).items():
        assert got["modules"]["down"][0][key] == pytest.approx(want, rel=1e-4), key
    untouched = got["modules"]["down"][1]  # layer 0 was not edited: a zero delta has no direction
    assert untouched["delta_norm"] == 0 and untouched["cos_target"] is None and untouched["cos_merged"] is None
    assert got["delta_share"] == {"up": [1.0], "down": [0.0, 1.0]}
    assert delta_shares({"modules": {"v": {"layers": [{"delta_norm": 3.0}, {"delta_norm": 4.0}]}}}) == \
        {"v": [pytest.approx(9 / 25), pytest.approx(16 / 25)]}


def test_parametric_numbers_of_a_full_merge_equal_closed_forms(tmp_path):
    """A LoRA-like merge (no laten_merge.json): every linear matrix of every layer is compared."""
    target = load_file(resolve("tiny:llama-target") / "model.safetensors")
    name = "model.layers.3.self_attn.v_proj.weight"
    w0 = target[name].double()
    _, merged = edited_copy(tmp_path, {name: (w0 + split_delta(w0, 0.0, 0.01, 2)).float()}, None)
    got = compare(resolve("tiny:llama-target"), merged)
    assert got["kind"] == "full" and set(got["modules"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(len(rows) == 4 for rows in got["modules"].values())
    row = got["modules"]["v"][3]
    want = closed_form(w0, 0.0, 0.01, 2)  # orthogonal: cos(delta, W0) = 0
    assert abs(row["cos_target"]) < 1e-4
    for key in ("cos_merged", "delta_norm", "relative_norm"):
        assert row[key] == pytest.approx(want[key], rel=1e-4), key
    others = [r for m, rows in got["modules"].items() for r in rows if (m, r["layer"]) != ("v", 3)]
    assert all(r["delta_norm"] == 0 and r["cos_target"] is None for r in others)


# --- neuron overlap -----------------------------------------------------------------------------

def test_mean_jaccard_and_chance():
    masks = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert mean_jaccard(masks) == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert mean_jaccard(masks[:1]) is None
    assert chance(10, 100) == pytest.approx(10 / 190)


def test_stability_of_hand_made_scores():
    """Two layers, 6 FFN neurons, K = 2: layer 0 picks {0, 1} for every example (Jaccard 1),
    layer 1 picks {0, 1}, {2, 3}, {0, 2} (pairwise Jaccard 0, 1/3, 1/3)."""
    from laten_ray.arch import Shape
    shape = Shape("llama", n_layers=2, hidden=4, ffn=6, n_heads=2, n_kv_heads=2, head_dim=2, vocab=8, eps=1e-6)

    def scores(top1):
        ffn = torch.zeros(2, 6)
        ffn[0, [0, 1]] = torch.tensor([2.0, 1.0])
        ffn[1, top1] = torch.tensor([2.0, 1.0])
        return Scores(torch.zeros(2), torch.zeros(2), ffn, torch.arange(4.0).repeat(2, 1), 1)
    got = stability([scores([0, 1]), scores([2, 3]), scores([0, 2])], shape, {"up": 2, "v": 1, "o": 1})
    assert got["ffn"] == [1.0, pytest.approx(2 / 9)]
    assert got["o"] == [1.0, 1.0] and got["v"] == [1.0, 1.0]


# --- the command, on a real small study ---------------------------------------------------------

@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze-study")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "jobs.study", "--config", str(REPO / "configs" / "study-demo.yaml"),
                           "--address", "local", "seeds=1", "arms=[target,source,laten,sft-lora]", f"output_dir={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "demo"


@pytest.mark.slow
@pytest.mark.ray
def test_analyze_a_study_writes_every_file(small_study, tmp_path):
    import matplotlib.image

    from jobs.cli import main as cli
    out = tmp_path / "analysis"
    assert cli(["analyze", "--study", str(small_study), "--out", str(out), "--limit", "24"]) == 0
    for name in ("cka.png", "parametric.png", "neurons.png"):
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 600, name
    results = json.loads((out / "analysis.json").read_text())
    assert results["data"] == {"spec": "demo:align", "examples": 24, "answer_tokens": results["data"]["answer_tokens"],
                               "pieces": results["data"]["pieces"]}
    assert results["extract"] == {"spec": "demo:extract", "examples": 8} and results["rate"] == 0.1
    kinds = {p["arm"]: p["kind"] for p in results["parametric"]}
    assert kinds == {"laten": "laten", "sft-lora": "full"}
    laten = next(p for p in results["parametric"] if p["arm"] == "laten")
    assert set(laten["modules"]) == set(MODULES) and all(len(rows) == 4 for rows in laten["modules"].values())
    # the paper's finding, on the demo pair too: the deltas are nearly orthogonal to the weights
    assert all(abs(r["cos_target"]) < 0.3 for rows in laten["modules"].values() for r in rows)
    assert [d["arm"] for d in results["neurons"]["delta_share"]] == ["laten"]
    for m in MODULES:
        rep = results["representation"]["modules"][m]
        assert len(rep["cka"]) == 4 and len(rep["cka"][0]) == 6 and -0.1 < rep["mean"] <= 1
    md = (out / "analysis.md").read_text()
    for text in ("![CKA](cka.png)", "![parametric](parametric.png)", "![neurons](neurons.png)", "| laten | 0 | up |",
                 "| sft-lora | 0 | gate |"):
        assert text in md


@pytest.mark.slow
@pytest.mark.ray
def test_ray_gives_the_in_process_numbers(small_study, tmp_path):
    from jobs.analyze import main
    args = ["--study", str(small_study), "--limit", "16", "--extract", "demo:extract"]
    assert main([*args, "--out", str(tmp_path / "here")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--address", "local"]) == 0
    here, there = (json.loads((tmp_path / d / "analysis.json").read_text()) for d in ("here", "ray"))
    assert here.pop("seconds") and there.pop("seconds")
    assert here == there


def test_cli_errors_name_what_is_missing(capsys):
    from jobs.cli import main as cli
    assert cli(["analyze", "--source", "tiny:llama-source", "--out", "x"]) == 2
    assert "give --target, --data" in capsys.readouterr().err
    assert cli(["analyze", "--source", "tiny:llama-source", "--target", "tiny:llama-target", "--data", "demo:nope",
                "--out", "x"]) == 2
    assert "unknown demo split" in capsys.readouterr().err
    assert cli(["analyze", "--study", "/nonexistent/study"]) == 2
    assert "no plan.json" in capsys.readouterr().err
