"""Statistics of the counter-based noise: N(0, 1), independent across draws, inputs, elements, seeds."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from drt_fast import ops

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
    # the tails, which Box-Muller with a 24-bit uniform cuts only beyond 5.77 sigma
    for threshold in (2.0, 3.0, 4.0):
        expected = 2 * scipy.stats.norm.sf(threshold)
        observed = np.mean(np.abs(z) > threshold)
        assert abs(observed - expected) < 5 * math.sqrt(expected / z.size)
    assert np.abs(z).max() <= math.sqrt(-2 * math.log(2.0**-24)) + 1e-4


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
