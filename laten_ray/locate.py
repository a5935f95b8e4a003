"""Locate, part 2 (docs/method.md §2-3): layer alignment, top-K neurons and the source's
knowledge slices; `Source` and `Target` are the two models that locate."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .arch import Arch, Shape
from .attribution import Scores, attribute_each
from .data import Example
from .models import load_model, load_tokenizer, pick_device
from .score_cache import ScoreCache, cache_folder

FFN_MODULES = ("up", "down")  # one FFN neuron k = row k of up_proj + column k of down_proj
GROUP = 64  # examples of one call that share each per-layer projection (attribute_each's group)


def neuron_counts(target: Shape, rate: float, modules) -> dict[str, int]:
    """K per module type, from the target's sizes: K = rate * (target's neurons of that type)."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    return {m: max(1, round(rate * target.neurons(m))) for m in modules}


def module_scores(scores: Scores, shape: Shape, module: str) -> torch.Tensor:
    """Per-neuron scores of one module type. [L, n]"""
    if module in FFN_MODULES:
        return scores.ffn
    if module == "o":
        return scores.attn
    return scores.v_rows(shape.n_kv_heads, shape.head_dim)


def align_layers(layer_scores: torch.Tensor, n_target_layers: int) -> torch.Tensor:
    """The top-L_t source layers by score, sorted by depth: entry i feeds target layer i. [L_t]"""
    if layer_scores.numel() < n_target_layers:
        raise ValueError(f"source has {layer_scores.numel()} layers, fewer than the target's "
                         f"{n_target_layers}")
    return layer_scores.topk(n_target_layers).indices.sort().values


def top_neurons(per_neuron: torch.Tensor, k: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row, best first (rank r of the source meets rank r of the target). [L, k] each"""
    if k > per_neuron.shape[-1]:
        raise ValueError(f"{what}: K={k} neurons asked for but only {per_neuron.shape[-1]} exist; "
                         "lower the rate")
    top = per_neuron.topk(k, dim=-1)
    return top.indices, top.values


@dataclass
class Located:
    """One model's selection. For the source, `slices` holds the selected neuron vectors."""
    layers: dict[str, torch.Tensor]  # module -> [L_t] layer of this model feeding target layer i
    index: dict[str, torch.Tensor]   # module -> [L_t, K] neuron indices, best first
    slices: dict[str, torch.Tensor] | None = None  # module -> [L_t, K, d_s]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slices or {}).values())


def locate_source(arch: Arch, scores: Scores, target: Shape, counts: dict[str, int]) -> Located:
    """Align source layers to the target's, pick top-K neurons there and extract their vectors."""
    shape = arch.shape
    by_kind = {"ffn": align_layers(scores.layer_ffn, target.n_layers),
               "attn": align_layers(scores.layer_attn, target.n_layers)}
    layers, index, slices = {}, {}, {}
    for module, k in counts.items():
        chosen = by_kind["ffn" if module in FFN_MODULES else "attn"]  # [L_t]
        idx, _ = top_neurons(module_scores(scores, shape, module)[chosen], k, f"source {module}")
        layers[module], index[module] = chosen, idx
        slices[module] = torch.stack([arch.neuron_vectors(int(l), module, idx[i])
                                      for i, l in enumerate(chosen.tolist())])  # [L_t, K, d_s]
    return Located(layers, index, slices)


def locate_target(scores: Scores, shape: Shape, counts: dict[str, int]) -> Located:
    """The target's own top-K neurons in every layer (no alignment: layer i is layer i)."""
    all_layers = torch.arange(shape.n_layers)
    layers, index = {}, {}
    for module, k in counts.items():
        layers[module] = all_layers
        index[module], _ = top_neurons(module_scores(scores, shape, module), k, f"target {module}")
    return Located(layers, index)


class _Model:
    """A loaded model (or a given one) with its tokenizer, seen through its family table, that
    counts the seconds it spends in attribution and, with a score cache (score_cache.py), its
    cache hits and misses in examples."""

    def __init__(self, spec: str, dtype: str, device: str, batch_size: int, chunk_mb: int,
                 model=None, tokenizer=None, cache: str = "", precision: str = "float32", kernel: str = "series"):
        self.tokenizer = tokenizer or load_tokenizer(spec)
        self.model = model or load_model(spec, dtype, pick_device(device))
        self.arch = Arch(self.model)
        self.batch_size, self.chunk_mb, self.budget = batch_size, chunk_mb, chunk_mb << 20
        self.precision, self.kernel = precision, kernel
        folder = cache_folder(cache)
        self.cache = ScoreCache(folder, self.model) if folder else None
        self.attribution_seconds = 0.0
        self.cache_hits = self.cache_misses = 0

    def scores(self, examples: list[Example]) -> list[Scores]:
        """Each example's scores; the examples share every per-layer projection. With a cache,
        an example seen before is read back, and the others are attributed together (once: a
        process that finds another attributing the same model waits for it and reads)."""
        t0 = time.perf_counter()
        cache = self.cache
        if cache is None:
            each = attribute_each(self.arch, self.tokenizer, examples, self.batch_size, self.budget, GROUP,
                                  self.precision, self.kernel)
        else:
            keys = [cache.key(self.tokenizer, e, self.chunk_mb, self.precision, self.kernel) for e in examples]
            each, missing = [cache.get(k) for k in keys], []
            if any(s is None for s in each):
                with cache.lock():
                    each = [s or cache.get(k) for s, k in zip(each, keys)]  # written while we waited
                    missing = [i for i, s in enumerate(each) if s is None]
                    if missing:
                        fresh = attribute_each(self.arch, self.tokenizer, [examples[i] for i in missing],
                                               self.batch_size, self.budget, GROUP, self.precision, self.kernel)
                        for i, s in zip(missing, fresh):
                            cache.put(keys[i], s)
                            cache.note_computed(keys[i])
                            each[i] = s
            self.cache_misses += len(missing)
            self.cache_hits += len(examples) - len(missing)
        self.attribution_seconds += time.perf_counter() - t0
        return each

    def take_seconds(self) -> float:
        """Attribution seconds since the last call (cache reads and writes included)."""
        seconds, self.attribution_seconds = self.attribution_seconds, 0.0
        return seconds


class Source(_Model):
    """The source role's model: slices of its top neurons in its best L_t layers."""

    def __init__(self, cfg, model=None, tokenizer=None):
        """Loads cfg.source unless an already built model and tokenizer are given."""
        super().__init__(cfg.source.model, cfg.source.dtype, cfg.source.device,
                         cfg.attribution.batch_size, cfg.attribution.chunk_mb, model, tokenizer,
                         cfg.attribution.cache, cfg.attribution.precision, cfg.attribution.kernel)

    def locate(self, examples: list[Example], target: Shape, counts: dict[str, int],
               on_cpu: bool = True, summed: bool = False) -> list[Located]:
        """One Located with slices per example (on CPU unless `on_cpu` is False); `summed`: one
        for the scores summed over the examples."""
        out = []
        for scores in _summed(self.scores(examples)) if summed else self.scores(examples):
            located = locate_source(self.arch, scores, target, counts)
            if on_cpu:
                located.slices = {m: t.detach().cpu() for m, t in located.slices.items()}
            out.append(located)
        return out


class Target(_Model):
    """The target role's frozen model: its own top-K neurons for each example."""

    def __init__(self, cfg, rate: float, dtype: str | None = None, model=None, tokenizer=None):
        """Loads cfg.target (in `dtype` if given) unless an already built model is given; K
        from `rate`."""
        super().__init__(cfg.target.model, dtype or cfg.target.dtype, cfg.target.device,
                         cfg.attribution.batch_size, cfg.attribution.chunk_mb, model, tokenizer,
                         cfg.attribution.cache, cfg.attribution.precision, cfg.attribution.kernel)
        self.counts = neuron_counts(self.arch.shape, rate, cfg.transfer.modules)

    def locate(self, examples: list[Example], summed: bool = False) -> list[Located]:
        """One Located per example; `summed`: one for the scores summed over the examples."""
        each = self.scores(examples)
        return [locate_target(scores, self.arch.shape, self.counts) for scores in (_summed(each) if summed else each)]


def _summed(each: list[Scores]) -> list[Scores]:
    return [sum(each[1:], each[0])]
