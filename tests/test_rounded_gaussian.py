"""The discrete noise's table (drt_fast/ops/rounded_gaussian.py): its thresholds are the rounded
Gaussian's CDF rounded to 1/2^64, computed independently here at twice the precision; its
half-width is the smallest that drops only zeros; its total-variation bound covers the
exact distance; its guide counts the thresholds below every bucket."""
import bisect
import math

import mpmath
import pytest
import torch

from drt_fast.errors import DrtFastError
from drt_fast.ops import discrete_table
from drt_fast.ops.rounded_gaussian import guide_bits

# (sigma, grid): digits' grid, 8-bit images at Cohen's sigmas, a sigma that is no short
# binary fraction, a grid of one step per unit, a noise narrower than the grid step
CASES = [(0.25, 16), (0.5, 255), (0.12, 255), (1.0, 1), (0.01, 255)]


def _unsigned(table):
    return [int(t) % 2**64 for t in table.thresholds.tolist()]


def _cdf(i, s):
    """P(I <= i) for the Gaussian of standard deviation s (grid steps) rounded to integers."""
    return mpmath.ncdf((mpmath.mpf(i) + mpmath.mpf(0.5)) / s)


@pytest.mark.parametrize("sigma,grid", CASES)
def test_thresholds_are_the_rounded_cdf(sigma, grid):
    table = discrete_table(sigma, grid)
    K = table.half_width
    with mpmath.workprec(512):
        s = mpmath.mpf(sigma) * grid
        want = [int(mpmath.nint(2**64 * _cdf(j - K, s))) for j in range(2 * K)]
        # K is the smallest half-width whose dropped thresholds all round to 0 (and 2^64)
        assert 2**64 * _cdf(-K - 1, s) < 0.5 <= 2**64 * _cdf(-K, s) or K == 1
    assert _unsigned(table) == want
    assert all(a <= b for a, b in zip(want, want[1:]))
    assert all(want[j] + want[2 * K - 1 - j] == 2**64 for j in range(K))  # exactly symmetric


@pytest.mark.parametrize("sigma,grid", CASES)
def test_total_variation_bound_covers_the_exact_distance(sigma, grid):
    table = discrete_table(sigma, grid)
    K, t = table.half_width, _unsigned(table)
    edges = [0, *t, 2**64]
    with mpmath.workprec(512):
        s = mpmath.mpf(sigma) * grid
        tv = 2 * _cdf(-K - 1, s)                            # both tails beyond +-K: never sampled
        for i in range(-K, K + 1):
            sampled = mpmath.mpf(edges[i + K + 1] - edges[i + K]) / 2**64
            tv += abs(sampled - (_cdf(i, s) - _cdf(i - 1, s)))
        tv /= 2
        assert tv <= table.tv_bound <= tv * (1 + 1e-12) + 1e-30
    # rounding each threshold moves at most half a unit: (2K + 1) bins, two tails below 2^-65
    assert table.tv_bound <= (2 * K + 2) / 2**64
    assert table.slack(1000) == pytest.approx(1000 * table.tv_bound) and table.slack(1000) >= 1000 * table.tv_bound


@pytest.mark.parametrize("sigma,grid", CASES)
def test_sampled_probabilities_are_symmetric_and_close_to_the_gaussian(sigma, grid):
    table = discrete_table(sigma, grid)
    p = table.probabilities()
    K = table.half_width
    assert len(p) == 2 * K + 1 and math.isclose(sum(p), 1.0, rel_tol=1e-12)
    assert p == p[::-1]
    with mpmath.workprec(256):
        s = mpmath.mpf(sigma) * grid
        for i in (0, 1, K // 3):
            exact = float(_cdf(i, s) - _cdf(i - 1, s))
            assert p[K + i] == pytest.approx(exact, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("sigma,grid", CASES)
def test_guide_counts_thresholds_below_each_bucket(sigma, grid):
    table = discrete_table(sigma, grid)
    t = _unsigned(table)
    bits = guide_bits(len(t))
    guide = table.guide.tolist()
    assert len(guide) == 2**bits + 1 and table.guide.dtype == torch.int32
    step = 2 ** (64 - bits)
    for b, entry in enumerate(guide):
        below = bisect.bisect_left(t, b * step)
        holds = bisect.bisect_left(t, (b + 1) * step) != below
        assert entry == (~below if holds else below)
    # the share of uniforms whose bucket must be scanned stays small
    assert sum(e < 0 for e in guide) / 2**bits <= max(1 / 32, len(t) / 2**16)


def test_tables_are_built_once():
    assert discrete_table(0.25, 16) is discrete_table(0.25, 16)
    assert discrete_table(0.25, 16) is not discrete_table(0.25, 17)


@pytest.mark.parametrize("sigma,grid,message", [
    (0.25, 0, "grid must be in"),
    (0.25, 2**20 + 1, "grid must be in"),
    (0.0, 255, "sigma must be a finite number > 0"),
    (float("nan"), 255, "sigma must be a finite number > 0"),
    (100.0, 2**20, "use a coarser grid"),
])
def test_bad_tables_are_refused(sigma, grid, message):
    with pytest.raises(DrtFastError, match=message):
        discrete_table(sigma, grid)
