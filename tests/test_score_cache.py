"""The attribution score cache (laten_ray/score_cache.py): a hit is the very bits attribution
computed, training from it is bit-identical, the key is the example and the settings (not the
batch, which moves scores by rounding only), concurrent processes attribute each example once and
never expose a partial file, a damaged file is recomputed."""
import multiprocessing
from pathlib import Path

import pytest
import torch

from laten_ray import checkpoint as ckpt
from laten_ray import locate
from laten_ray.config import ConfigError, config_from_dict
from laten_ray.data import read_examples
from laten_ray.locate import Source, Target
from laten_ray.models import load_model
from laten_ray.score_cache import ENV, ScoreCache, computed, model_hash
from laten_ray.train import train

from helpers import tiny_config_dict


@pytest.fixture(autouse=True)
def no_cache_from_env(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def config(tmp_path, cache="", family="qwen2", **attribution):
    tree = tiny_config_dict(family, tmp_path / "runs")
    tree["attribution"] = {"cache": str(cache), **attribution}
    return config_from_dict(tree)


def examples(n=6):
    return read_examples("demo:extract", limit=n)


def assert_same_scores(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name, t in x.tensors().items():
            u = y.tensors()[name]
            assert t.dtype == u.dtype == torch.float32 and torch.equal(t, u), name
        assert x.n_examples == y.n_examples == 1


def cached_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def count_forwards(model) -> list:
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


# --- hits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_hit_is_the_same_bits_without_running_the_model(tmp_path, family):
    batch = examples()
    plain = Target(config(tmp_path, family=family), 0.25).scores(batch)

    cold = Target(config(tmp_path, tmp_path / "cache", family=family), 0.25)
    assert_same_scores(cold.scores(batch), plain)
    assert (cold.cache_hits, cold.cache_misses) == (0, len(batch))
    assert len(cached_files(tmp_path / "cache")) == len(batch)  # one file per (model, example)
    assert cold.take_seconds() > 0

    warm = Target(config(tmp_path, tmp_path / "cache", family=family), 0.25)  # a fresh load
    forwards = count_forwards(warm.model)
    assert_same_scores(warm.scores(batch), plain)
    assert (warm.cache_hits, warm.cache_misses) == (len(batch), 0)
    assert not forwards  # the model did not run
    assert warm.take_seconds() > 0  # the read is counted too
    for a, b in zip(warm.locate(batch), cold.locate(batch)):
        assert all(torch.equal(a.index[m], b.index[m]) for m in a.index)


def test_the_environment_variable_turns_the_cache_on_and_the_config_wins(tmp_path, monkeypatch):
    assert Target(config(tmp_path), 0.25).cache is None  # off by default
    monkeypatch.setenv(ENV, str(tmp_path / "from-env"))
    target = Target(config(tmp_path), 0.25)
    target.scores(examples(2))
    assert cached_files(tmp_path / "from-env") and target.cache_misses == 2
    named = Target(config(tmp_path, tmp_path / "named"), 0.25)
    named.scores(examples(2))
    assert cached_files(tmp_path / "named") and len(cached_files(tmp_path / "from-env")) == 2  # not written to


def test_a_relative_folder_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Target(config(tmp_path, "rel/cache"), 0.25).scores(examples(2))
    assert cached_files(tmp_path / "rel" / "cache")


def test_the_cache_path_must_not_have_surrounding_spaces(tmp_path):
    with pytest.raises(ConfigError, match="attribution.cache"):
        config(tmp_path, " /tmp/x")
    assert config_from_dict(tiny_config_dict("llama", tmp_path)).attribution.cache == ""


# --- the key ---------------------------------------------------------------------------------

def test_the_key_is_the_example_and_the_settings_not_the_batch(tmp_path):
    batch = examples()
    target = Target(config(tmp_path, tmp_path / "cache"), 0.25)
    target.scores(batch)
    target.scores(batch)                    # the same batch: a hit
    target.scores(batch[::-1])              # same members, other positions
    target.scores(batch[:3])                # a subset
    target.scores(batch[:1])                # one example alone, as merge does
    assert (target.cache_hits, target.cache_misses) == (6 + 6 + 3 + 1, 6)
    assert len(cached_files(tmp_path / "cache")) == 6

    other = Target(config(tmp_path, tmp_path / "cache", batch_size=2), 0.25)  # batching: rounding only
    other.scores(batch)
    assert (other.cache_hits, other.cache_misses) == (6, 0)
    chunked = Target(config(tmp_path, tmp_path / "cache", chunk_mb=1), 0.25)  # the projection's chunks
    chunked.scores(batch)
    assert (chunked.cache_hits, chunked.cache_misses) == (0, 6)
    bf16 = Target(config(tmp_path, tmp_path / "cache"), 0.25, dtype="bfloat16")
    bf16.scores(batch)
    assert (bf16.cache_hits, bf16.cache_misses) == (0, 6)
    assert len(cached_files(tmp_path / "cache")) == 18
    assert len({p.parent for p in cached_files(tmp_path / "cache")}) == 2  # one folder per model


def test_the_batch_moves_scores_by_rounding_only(tmp_path):
    """What the key leaves out, measured: the demo pair's extract examples attributed alone and
    in one group of 8 differ by at most 1e-4 of the largest score and select the same neurons."""
    from laten_ray.study.config import load_study
    cfg = load_study(Path(__file__).resolve().parents[1] / "configs" / "study-demo.yaml").run_config(0, tmp_path / "r")
    batch = read_examples("demo:extract")
    for model in (Source(cfg), Target(cfg, cfg.transfer.rate)):
        together = model.scores(batch)
        for example, joint in zip(batch, together):
            (alone,) = model.scores([example])
            for name, t in joint.tensors().items():
                assert (t - alone.tensors()[name]).abs().max() <= 1e-4 * t.abs().max(), name
    target = Target(cfg, cfg.transfer.rate)
    for example, joint in zip(batch, target.locate(batch)):
        (alone,) = target.locate([example])
        assert all(torch.equal(alone.index[m], joint.index[m]) for m in joint.index)


def test_model_hash_follows_the_weights_only():
    a, b = load_model("tiny:llama-target"), load_model("tiny:llama-target")
    assert model_hash(a) == model_hash(b)  # two loads of the same weights
    with torch.no_grad():
        w = b.model.layers[1].mlp.down_proj.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(float("inf")))  # one ulp in one weight
    assert model_hash(a) != model_hash(b)
    half = load_model("tiny:llama-target", "bfloat16")
    assert model_hash(half) == model_hash(load_model("tiny:llama-target", "bfloat16"))
    assert model_hash(half) != model_hash(a)
    assert model_hash(a) != model_hash(load_model("tiny:llama-source"))


# --- training --------------------------------------------------------------------------------

def train_tree(root, **attribution):
    tree = tiny_config_dict("llama", root, steps=5)
    tree["attribution"] = {"batch_size": 2, **attribution}  # several attribution groups
    return tree


def test_training_from_the_cache_is_bit_identical(tmp_path, monkeypatch):
    calls = []
    real = locate.attribute_each
    monkeypatch.setattr(locate, "attribute_each", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = ckpt.load_checkpoint(train(config_from_dict(train_tree(tmp_path / "plain"))))
    n_plain = len(calls)
    cache = tmp_path / "cache"
    cold = ckpt.load_checkpoint(train(config_from_dict(train_tree(tmp_path / "cold", cache=str(cache)))))
    assert len(calls) == 2 * n_plain and cached_files(cache)  # computed as without the cache, stored
    files = {p: p.stat().st_mtime_ns for p in cached_files(cache)}
    warm = ckpt.load_checkpoint(train(config_from_dict(train_tree(tmp_path / "warm", cache=str(cache)))))
    assert len(calls) == 2 * n_plain  # every attribution was a hit
    assert {p: p.stat().st_mtime_ns for p in cached_files(cache)} == files  # nothing rewritten
    for run in (cold, warm):
        assert run["step"] == plain["step"] == 5
        for k, v in plain["hypernet"].items():
            assert torch.equal(v, run["hypernet"][k]), k
        assert [m["lm_loss"] for m in run["history"]] == [m["lm_loss"] for m in plain["history"]]


class Crash(Exception):
    pass


def test_a_run_resumes_with_the_cache_turned_on(tmp_path):
    whole = ckpt.load_checkpoint(train(config_from_dict(train_tree(tmp_path / "a"))))

    def crash_after_three(metrics):
        if metrics["step"] == 3:
            raise Crash
    with pytest.raises(Crash):
        train(config_from_dict(train_tree(tmp_path / "b")), on_step=crash_after_three)
    resumed = ckpt.load_checkpoint(train(config_from_dict(train_tree(tmp_path / "b", cache=str(tmp_path / "c")))))
    for k, v in whole["hypernet"].items():
        assert torch.equal(v, resumed["hypernet"][k]), k
    with pytest.raises(ConfigError, match="attribution"):  # other attribution keys still count
        train(config_from_dict(train_tree(tmp_path / "b", chunk_mb=1)))


# --- damage and concurrency ------------------------------------------------------------------

def damage_truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_flip_a_score(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes: still a valid safetensors file
    path.write_bytes(bytes(data))


def damage_garbage(path):
    path.write_bytes(b"\x00\xff" * 100)


def damage_empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_score, damage_garbage, damage_empty])
def test_a_damaged_file_is_recomputed_and_rewritten(tmp_path, damage):
    batch = examples(3)
    first = Target(config(tmp_path, tmp_path / "cache"), 0.25)
    want = first.scores(batch)
    for path in cached_files(tmp_path / "cache"):  # all of them: recomputed as the same batch, the same bits
        damage(path)
    again = Target(config(tmp_path, tmp_path / "cache"), 0.25)
    assert_same_scores(again.scores(batch), want)
    assert (again.cache_hits, again.cache_misses) == (0, 3)
    assert_same_scores(again.scores(batch), want)  # rewritten whole: now a hit
    assert (again.cache_hits, again.cache_misses) == (3, 3)


def test_a_cache_that_cannot_be_written_only_warns(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    target = Target(config(tmp_path, tmp_path / "a-file"), 0.25)
    with pytest.warns(UserWarning, match="attribution cache: could not write"):
        got = target.scores(examples(2))
    assert_same_scores(got, Target(config(tmp_path), 0.25).scores(examples(2)))


def _worker(cache, out, barrier, rounds):
    """One Ray-worker-like process: attribute two batches through the cache, then write and
    read one example's key over and over while the others do the same."""
    torch.set_num_threads(1)
    cfg = config_from_dict(tiny_config_dict("qwen2", Path(out).parent / "runs"))
    cfg.attribution.cache = str(cache)
    target = Target(cfg, 0.25)
    batches = [examples(4), examples(6)[4:]]
    barrier.wait()
    got = [target.scores(b) for b in batches]
    store = ScoreCache(cache, target.model)
    key = store.key(target.tokenizer, batches[0][0], target.chunk_mb)
    seen = 0
    for _ in range(rounds):
        store.put(key, got[0][0])
        read = store.get(key)
        assert read is not None  # a reader finds a whole file or none, never a broken one
        assert_same_scores([read], got[0][:1])
        seen += 1
    torch.save({"scores": [[s.tensors() for s in g] for g in got], "seen": seen,
                "hits": target.cache_hits, "misses": target.cache_misses}, out)


@pytest.mark.slow  # over 10 s on 2 cores
def test_concurrent_writers_of_the_same_keys(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n, rounds = 3, 40
    barrier = ctx.Barrier(n)
    outs = [tmp_path / f"out{i}.pt" for i in range(n)]
    procs = [ctx.Process(target=_worker, args=(tmp_path / "cache", str(o), barrier, rounds)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * n
    results = [torch.load(o) for o in outs]
    want = Target(config(tmp_path), 0.25)
    plain = [[s.tensors() for s in want.scores(b)] for b in (examples(4), examples(6)[4:])]
    for r in results:
        assert r["seen"] == rounds and r["hits"] + r["misses"] == 6
        for got, ref in zip(r["scores"], plain):
            for g, e in zip(got, ref):
                assert all(torch.equal(g[k], e[k]) for k in e)
    assert len(cached_files(tmp_path / "cache")) == 6
    assert not [p for p in (tmp_path / "cache").rglob(".*") if p.name != ".lock"]  # no temporary files left
    # each example was attributed by one process only: the others waited for it and read
    (log,) = computed(tmp_path / "cache").values()
    assert len(log) == len(set(log)) == 6
