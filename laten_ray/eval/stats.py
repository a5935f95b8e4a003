"""Paired comparisons of two evaluations on the same items (for `laten study`, docs/method.md §8).

Every function takes per-item scores in the same item order (0/1 verdicts, or per-item pass@1
fractions). Intervals are 95% unless said otherwise; randomness is seeded, so a report rebuilt
from the same results prints the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, permutation_test


@dataclass(frozen=True)
class Paired:
    n: int                      # items scored by both
    difference: float           # mean(b) - mean(a)
    ci95: tuple[float, float]   # paired bootstrap (percentile) interval of the difference
    only_a: int                 # items a got right and b wrong (0/1 scores)
    only_b: int                 # items b got right and a wrong
    p_mcnemar: float | None     # exact McNemar p-value, two-sided (0/1 scores only)
    p_permutation: float | None = None  # paired permutation p-value (scores not all 0/1)

    @property
    def p(self) -> float:
        return self.p_mcnemar if self.p_mcnemar is not None else self.p_permutation


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of mean(b - a), resampling items with replacement (the same
    items for both arms, which is what makes it paired)."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)  # [N]
    if d.size == 0:
        raise ValueError("no items to compare")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)  # [R]
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: under no difference the discordant items split 50/50."""
    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_b, n, 0.5, alternative="two-sided").pvalue)


def permutation_p(a, b, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean(b - a): under no difference each item's two
    scores are exchangeable, so their sign is flipped at random (exact when 2^N <= resamples).
    For scores that are not all 0/1 (several samples or seeds per item)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.array_equal(a, b):
        return 1.0
    result = permutation_test((a, b), lambda x, y, axis: np.mean(y - x, axis=axis), permutation_type="samples",
                              vectorized=True, n_resamples=resamples, rng=np.random.default_rng(seed))
    return float(result.pvalue)


def compare(a, b, resamples: int = 10_000, seed: int = 0) -> Paired:
    """b against a on the same items."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same items: {a.size} vs {b.size}")
    binary = bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
    only_a = int(((a == 1) & (b == 0)).sum()) if binary else 0
    only_b = int(((a == 0) & (b == 1)).sum()) if binary else 0
    return Paired(int(a.size), float(b.mean() - a.mean()), paired_bootstrap(a, b, resamples, seed),
                  only_a, only_b, mcnemar_exact(only_a, only_b) if binary else None,
                  None if binary else permutation_p(a, b, resamples, seed))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment for several comparisons (scipy offers only false-discovery
    control): the i-th smallest p is multiplied by (m - i), made monotone, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def _z(p: float) -> float:
    from scipy.stats import norm
    return float(norm.ppf(p))


def mdd_mcnemar(n: int, discordant: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest difference in proportions that an exact-McNemar-like test of `n` paired 0/1
    items detects with `power` at two-sided `alpha`, by Connor's (1987) sample-size formula
    n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2, psi the discordant share. A gain of d needs
    at least d of the items discordant, so psi = max(observed, d): with no discordant items seen
    the answer is the gain made of improvements only."""
    if n < 1:
        return float("nan")
    za, zb = _z(1 - alpha / 2), _z(power)

    def needed(d: float) -> float:
        psi = max(discordant, d)
        return (za * psi ** 0.5 + zb * max(psi - d * d, 0.0) ** 0.5) ** 2 / (d * d) - n
    return _smallest(needed)


def mdd_paired(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest mean paired difference that `n` items detect with `power` at two-sided
    `alpha` (normal approximation, as Miller 2024 "Adding Error Bars to Evals" sizes paired
    evaluations): d = (z_a + z_b) sigma / sqrt(n). sigma is the observed standard deviation of the
    per-item differences, or sqrt(d (1 - d)) if larger (a gain of d made of improvements only)."""
    if n < 1:
        return float("nan")
    za, zb = _z(1 - alpha / 2), _z(power)

    def needed(d: float) -> float:
        sigma = max(sd, (d * (1 - d)) ** 0.5)
        return ((za + zb) * sigma / d) ** 2 - n
    return _smallest(needed)


def _smallest(needed) -> float:
    """The smallest d in (0, 1] with needed(d) <= 0 (needed falls as d grows), to 1e-6."""
    lo, hi = 1e-9, 1.0
    if needed(hi) > 0:
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if needed(mid) <= 0 else (mid, hi)
    return hi
