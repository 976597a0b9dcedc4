"""drt_fast.stats: Clopper-Pearson, binomial test, radii, and the summary helpers."""
import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from drt_fast import stats
from drt_fast.errors import DrtFastError


def test_lower_confidence_bound_hand_values():
    # k = n: the bound solves p^n = alpha.
    for n, alpha in [(1, 0.05), (10, 0.001), (100_000, 0.001)]:
        assert stats.lower_confidence_bound(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-12)
    # k = 0: no evidence at all.
    assert stats.lower_confidence_bound(0, 10, 0.05) == 0.0
    # k = 1 of n: the bound solves 1 - (1-p)^n = alpha.
    assert stats.lower_confidence_bound(1, 20, 0.05) == pytest.approx(1 - 0.95 ** (1 / 20), rel=1e-10)
    # Cohen's statsmodels call, proportion_confint(k, n, 2*alpha, "beta")[0], for k=50, n=100,
    # alpha=0.025 is the lower end of the exact 95 % interval: 0.39832 (standard tables).
    assert stats.lower_confidence_bound(50, 100, 0.025) == pytest.approx(0.398321, abs=1e-5)


def test_lower_confidence_bound_is_below_the_estimate_and_monotone():
    n, alpha = 200, 0.01
    bounds = [stats.lower_confidence_bound(k, n, alpha) for k in range(n + 1)]
    assert all(b < k / n or k == 0 for k, b in enumerate(bounds))
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9, 0.99])
def test_clopper_pearson_coverage_by_simulation(p):
    # P(bound > p) <= alpha for every p; the exact interval comes close to alpha from below.
    rng = np.random.default_rng(0)
    n, alpha, trials = 50, 0.1, 4000
    ks = rng.binomial(n, p, size=trials)
    table = {k: stats.lower_confidence_bound(k, n, alpha) for k in np.unique(ks)}
    misses = sum(table[k] > p for k in ks)
    # exact miss probability from the binomial law, then a check of the simulated rate
    exact = sum(binom.pmf(k, n, p) for k in range(n + 1) if stats.lower_confidence_bound(k, n, alpha) > p)
    assert exact <= alpha
    assert misses <= binom.ppf(0.9999, trials, alpha)


def test_lower_confidence_bound_rejects_bad_arguments():
    with pytest.raises(DrtFastError, match="alpha"):
        stats.lower_confidence_bound(5, 10, 0.0)
    with pytest.raises(DrtFastError, match="alpha"):
        stats.lower_confidence_bound(5, 10, 1.0)
    with pytest.raises(DrtFastError, match=r"\[0, n\]"):
        stats.lower_confidence_bound(11, 10, 0.05)
    with pytest.raises(DrtFastError, match="n must be"):
        stats.lower_confidence_bound(0, 0, 0.05)


def test_binom_pvalue():
    assert stats.binom_pvalue(5, 10) == pytest.approx(1.0)
    # 10 of 10: two-sided p = 2 * 0.5^10
    assert stats.binom_pvalue(10, 10) == pytest.approx(2 * 0.5 ** 10)
    # 8 of 10: P(X >= 8) + P(X <= 2) = 2 * (45 + 10 + 1) / 1024
    assert stats.binom_pvalue(8, 10) == pytest.approx(2 * 56 / 1024)
    with pytest.raises(DrtFastError):
        stats.binom_pvalue(3, 0)


def test_radius_and_max_radius():
    assert stats.radius(0.5, 0.5) == 0.0
    assert stats.radius(0.25, norm.cdf(2.0)) == pytest.approx(0.5)
    # docs/method.md: about 3.8 sigma for n = 1e5, alpha = 1e-3
    assert stats.max_radius(1.0, 100_000, 0.001) == pytest.approx(3.8, abs=0.05)
    assert stats.max_radius(0.5, 1000, 0.01) == pytest.approx(
        0.5 * norm.ppf(stats.lower_confidence_bound(1000, 1000, 0.01)), rel=1e-9)


def test_certified_accuracy_and_acr():
    radii = [0.0, 0.3, 0.8, 1.2, 0.5]
    correct = [0, 1, 1, 0, 1]   # row 0 abstained, row 3 certified but wrong
    assert stats.certified_accuracy(radii, correct, 0.0) == pytest.approx(3 / 5)
    assert type(stats.certified_accuracy(radii, correct, 0.5)) is float    # a float for a scalar r
    assert stats.certified_accuracy(radii, correct, [[0.0], [0.5]]).shape == (2, 1)
    assert stats.certified_accuracy(radii, correct, 0.5) == pytest.approx(2 / 5)
    assert stats.certified_accuracy(radii, correct, 1.0) == 0.0
    np.testing.assert_allclose(stats.certified_accuracy(radii, correct, [0.0, 0.3, 0.81]),
                               [0.6, 0.6, 0.0])
    assert stats.acr(radii, correct) == pytest.approx((0.3 + 0.8 + 0.5) / 5)
    assert stats.acr([], []) == 0.0
    with pytest.raises(DrtFastError, match="same length"):
        stats.acr([0.1, 0.2], [1])
    assert math.isclose(stats.certified_accuracy([], [], 0.0), 0.0)
