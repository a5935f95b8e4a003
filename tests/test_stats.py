"""Paired statistics: exact McNemar, Holm, and the paired bootstrap against scipy's."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import bootstrap

from laten_ray.eval.stats import compare, holm, mcnemar_exact, paired_bootstrap


def test_exact_mcnemar_is_the_binomial_tail_of_the_discordant_items():
    assert mcnemar_exact(1, 9) == pytest.approx(2 * (1 + 10) / 1024)  # 2 P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0)
    assert mcnemar_exact(0, 0) == 1.0


def test_holm_steps_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_compare_counts_discordant_items_and_the_difference():
    r = compare([1, 1, 0, 0], [1, 0, 1, 1])
    assert (r.n, r.only_a, r.only_b, r.difference) == (4, 1, 2, 0.25)
    assert r.p_mcnemar == pytest.approx(1.0)
    assert compare([0.5, 1.0], [1.0, 1.0]).p_mcnemar is None  # pass@1 fractions: no McNemar
    with pytest.raises(ValueError, match="same items: 2 vs 3"):
        compare([1, 0], [1, 0, 1])


def test_paired_bootstrap_matches_scipy_and_is_narrower_than_unpaired():
    rng = np.random.default_rng(1)
    a = (rng.random(300) < 0.4).astype(float)
    b = a.copy()
    b[rng.choice(np.flatnonzero(a == 0), 30, replace=False)] = 1.0  # b = a plus 30 more right
    lo, hi = paired_bootstrap(a, b, resamples=20_000, seed=0)
    assert lo < 0.1 < hi and lo > 0  # the true difference, and clearly above zero
    ref = bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, method="percentile",
                    n_resamples=20_000, random_state=0).confidence_interval
    assert (lo, hi) == pytest.approx((ref.low, ref.high), abs=0.01)
    unpaired = bootstrap((b,), np.mean, method="percentile", n_resamples=20_000, random_state=0).confidence_interval
    assert hi - lo < unpaired.high - unpaired.low  # pairing removes the items' shared difficulty
    assert paired_bootstrap(a, a) == (0.0, 0.0)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)  # seeded: reproducible


def test_permutation_p_is_exact_on_small_samples_and_used_for_fractions():
    from laten_ray.eval.stats import permutation_p
    # three items, each b - a = 1: of the 2^3 sign flips, 2 reach |mean| >= 1
    assert permutation_p([0, 0, 0], [1, 1, 1]) == pytest.approx(2 / 8)
    # differences 1, 1, -1, 0.5: flips with |mean| >= 1.5 / 4 are 10 of 16
    assert permutation_p([0, 0, 1, 0], [1, 1, 0, 0.5]) == pytest.approx(10 / 16)
    assert permutation_p([0.5, 1], [0.5, 1]) == 1.0
    r = compare([0.5, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert r.p_mcnemar is None and r.p == pytest.approx(2 / 8)
    assert compare([0, 1], [1, 1]).p == 1.0  # 0/1 scores: McNemar (one discordant item)
