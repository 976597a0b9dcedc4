"""Statistics of the counter-based noise: N(0, 1) out to its tails, independent across draws,
inputs, elements, seeds."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from drt_fast import ops
from drt_fast.ops import reference
from drt_fast.ops.extension import cpu_kernels

N_INPUTS, REPS, ELEMENTS = 8, 256, 3 * 16 * 16  # 8 * 256 * 768 = 1.57e6 samples


@pytest.fixture(scope="module")
def noise():
    """Standard normal draws [N_INPUTS, REPS, ELEMENTS] (x = 0, sigma = 1), fixed seed."""
    x = torch.zeros(N_INPUTS, 3, 16, 16)
    keys = torch.arange(N_INPUTS, dtype=torch.int64) * 7919 + 3
    first = torch.zeros(N_INPUTS, dtype=torch.int64)
    z = ops.noisy_draws(x, keys, first, REPS, 1.0, 20220425)
    return z.reshape(N_INPUTS, REPS, ELEMENTS).double().numpy()


def test_mean_and_variance(noise):
    z = noise.ravel()
    n = z.size
    assert n >= 1_000_000
    assert abs(z.mean()) < 5 / math.sqrt(n)  # 5 standard errors
    assert abs(z.var() - 1.0) < 5 * math.sqrt(2 / n)


def test_normality(noise):
    z = noise.ravel()
    assert scipy.stats.normaltest(z).pvalue > 1e-3
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    for threshold in (2.0, 3.0, 4.0):
        expected = 2 * scipy.stats.norm.sf(threshold)
        observed = np.mean(np.abs(z) > threshold)
        assert abs(observed - expected) < 5 * math.sqrt(expected / z.size)


TAIL_SEED, TAIL_KEY = 20240611, 3


def test_tail_frequencies():
    """|z| beyond 5, 5.5, 5.8, 6 and 6.5 at the Gaussian rate over 2^31 normals (2,048 draws of
    2^20 elements, a fixed seed): each count inside its Poisson interval of probability
    1 - 2e-6. The uniform of 24 bits that fed the log before issue 19 capped |z| at 5.77: no
    count above it (the expected number beyond 5.8 is 14)."""
    draws, elements = 2048, 1 << 20
    thresholds = [5.0, 5.5, 5.8, 6.0, 6.5]
    counts, largest = cpu_kernels.gaussian_tail_count(TAIL_SEED, TAIL_KEY, 0, draws, elements, thresholds)
    n = draws * elements
    for t, count in zip(thresholds, counts):
        mean = 2 * scipy.stats.norm.sf(t) * n
        assert scipy.stats.poisson.cdf(count, mean) > 1e-6 and scipy.stats.poisson.sf(count - 1, mean) > 1e-6, \
            (t, count, mean)
    assert counts[2] > 0 and largest > 6.0


def test_tail_count_hook_counts_what_noisy_draws_writes():
    draws, elements = 16, 1 << 18
    x = torch.zeros(1, elements)
    z = ops.noisy_draws(x, torch.tensor([TAIL_KEY]), torch.tensor([100]), draws, 1.0, TAIL_SEED).abs()
    counts, largest = cpu_kernels.gaussian_tail_count(TAIL_SEED, TAIL_KEY, 100, draws, elements, [4.9, 5.0])
    assert counts == [int((z > 4.9).sum()), int((z > 5.0).sum())] and counts[0] > 0
    assert largest == float(z.max())


def test_pairs_that_need_their_tail_word_match_the_reference():
    """The CPU kernel redoes such pairs (one in 2^17) after its vectorized pass: rows that hold
    dozens of them, bit for bit against the reference."""
    elements, seed, key = 1 << 16, 5, 11
    quads = torch.arange(elements // 4)
    draws = []
    for draw in range(64):
        w = reference.philox4x32_10(quads, torch.tensor(draw), torch.tensor(key), torch.tensor(0), seed, 0)
        if bool((reference.needs_tail_word(w[0]) | reference.needs_tail_word(w[2])).any()):
            draws.append(draw)
    assert len(draws) >= 8
    first = torch.tensor(draws)
    x = torch.zeros(len(draws), elements)
    keys = torch.full((len(draws),), key)
    ours = ops.noisy_draws(x, keys, first, 1, 1.0, seed)
    assert torch.equal(ours, ops.reference_noisy_draws(x, keys, first, 1, 1.0, seed))


def _max_abs_corr(a, b):
    """|Pearson correlation| between the rows of a and of b, flattened pairwise."""
    a, b = a.ravel(), b.ravel()
    return abs(np.corrcoef(a, b)[0, 1]), 5 / math.sqrt(a.size)


def test_independent_across_draws(noise):
    corr, bound = _max_abs_corr(noise[:, :-1], noise[:, 1:])  # draw r vs r + 1 of the same input
    assert corr < bound


def test_independent_across_inputs(noise):
    corr, bound = _max_abs_corr(noise[:-1], noise[1:])  # input b vs b + 1, same draw index
    assert corr < bound


@pytest.mark.parametrize("offset", [1, 2, 3, 4])
def test_independent_across_elements(noise, offset):
    # offsets 1..3 pair the Box-Muller outputs of one Philox block; 4 the next block
    corr, bound = _max_abs_corr(noise[..., :-offset], noise[..., offset:])
    assert corr < bound


def test_independent_across_seeds_and_of_its_square(noise):
    x = torch.zeros(N_INPUTS, 3, 16, 16)
    keys = torch.arange(N_INPUTS, dtype=torch.int64) * 7919 + 3
    other = ops.noisy_draws(x, keys, torch.zeros(N_INPUTS, dtype=torch.int64), REPS, 1.0, 20220426)
    other = other.reshape(noise.shape).double().numpy()
    corr, bound = _max_abs_corr(noise, other)
    assert corr < bound
    # the radius is shared within a Box-Muller pair: squares must still be uncorrelated
    corr, bound = _max_abs_corr(noise[..., 0::2] ** 2, noise[..., 1::2] ** 2)
    assert corr < bound
