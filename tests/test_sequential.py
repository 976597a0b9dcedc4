"""Sequential certification at fixed radii (drt_fast.sequential, SmoothedClassifier.certify_radii):
its thresholds against exact arithmetic, its soundness on the exact linear oracle, its
decision at n_max against fixed-n CERTIFY, and certificates that do not depend on the
batch size or the packing of inputs."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from drt_fast import sequential, stats
from drt_fast.errors import DrtFastError
from drt_fast.smoothing import SmoothedClassifier

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ exact thresholds
def exact_mixture(A, N, prior):
    """The Beta(a, b) mixture likelihood of A successes in N trials (a, b half-integers) as
    an exact rational: B(A + a, N - A + b) / B(a, b), whose Gamma functions of half-integers
    leave no pi behind."""
    def gamma_ratio(start, steps):            # Gamma(start + steps) / Gamma(start), exactly
        value = Fraction(1)
        for i in range(steps):
            value *= start + i
        return value
    a, b = Fraction(prior[0]), Fraction(prior[1])
    return gamma_ratio(a, A) * gamma_ratio(b, N - A) / gamma_ratio(a + b, N)


def exact_passes(A, N, p, alpha, prior):
    """M_N(p) >= 1/alpha in exact rational arithmetic (p and alpha: the floats as given)."""
    p = Fraction(p)
    return exact_mixture(A, N, prior) * Fraction(alpha) >= p**A * (1 - p) ** (N - A)


@pytest.mark.parametrize("p, alpha, prior", [(0.5, 1e-4, (0.5, 0.5)), (0.8413447460685429, 1e-3, (0.5, 0.5)),
                                            (0.97725, 1e-4, (90.5, 10.5)), (0.6, 0.05, (3.5, 97.5))])
def test_certify_thresholds_are_exact_where_exact_arithmetic_reaches(p, alpha, prior):
    Ns = np.array([1, 7, 40, 100, 250])
    for N, A in zip(Ns, stats.mixture_thresholds(p, Ns, alpha, prior)):
        N, A = int(N), int(A)
        if A <= N:
            assert A > p * N and exact_passes(A, N, p, alpha, prior), (N, A)
        if A - 1 > p * N:               # one fewer success no longer passes
            assert not exact_passes(A - 1, N, p, alpha, prior), (N, A)
        if A > N:                       # none passes
            assert not exact_passes(N, N, p, alpha, prior)


@pytest.mark.parametrize("p, alpha", [(0.9, 1e-2), (0.5, 1e-3)])
def test_futility_thresholds_are_exact_where_exact_arithmetic_reaches(p, alpha):
    Ns = np.array([3, 30, 100, 300])
    for N, A in zip(Ns, stats.mixture_thresholds(p, Ns, alpha, above=False)):
        N, A = int(N), int(A)
        if A >= 0:
            assert A < p * N and exact_passes(A, N, p, alpha, (0.5, 0.5))
        if 0 <= A + 1 < p * N:
            assert not exact_passes(A + 1, N, p, alpha, (0.5, 0.5))


def fsum_log_ratio(A, N, p, prior):
    """log M_N(p) as a compensated sum of one log per factor: an evaluation independent of
    betaln, good to ~1e-10 at N = 1e5."""
    a, b = prior
    terms = [math.log(a + i) for i in range(A)] + [math.log(b + i) for i in range(N - A)]
    terms += [-math.log(a + b + i) for i in range(N)]
    return math.fsum(terms) - A * math.log(p) - (N - A) * math.log1p(-p)


def test_large_n_thresholds_keep_their_margin():
    level = math.log(1 / 1e-4)
    for p, prior in ((0.5, (0.5, 0.5)), (0.99865, (100.5, 0.5)), (0.977, (60.5, 40.5))):
        Ns = np.array([20_000, 100_000])
        for N, A in zip(Ns, stats.mixture_thresholds(p, Ns, 1e-4, prior)):
            N, A = int(N), int(A)
            assert fsum_log_ratio(A, N, p, prior) >= level + stats.LOG_MARGIN / 2
            assert fsum_log_ratio(A - 1, N, p, prior) < level + 2 * stats.LOG_MARGIN


def test_the_final_threshold_is_clopper_pearsons():
    for p in (0.5, 0.8413, 0.99865):
        k = stats.clopper_pearson_threshold(p, 10_000, 0.0009)
        assert stats.lower_confidence_bound(k, 10_000, 0.0009) >= p
        assert stats.lower_confidence_bound(k - 1, 10_000, 0.0009) < p
    k = stats.clopper_pearson_threshold(0.5, 100, 0.05, strict=True)
    assert stats.lower_confidence_bound(k, 100, 0.05) > 0.5 >= stats.lower_confidence_bound(k - 1, 100, 0.05)


# ------------------------------------------------------------------ soundness on an oracle
class LinearScore(nn.Module):
    """Logits [s, -s], s = w.x + b, in float64: under the noise, class 0 has probability
    Phi(s / (sigma ||w||)), so the exact certified radius is s / ||w|| (||w|| = 1 here)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.tensor([0.6, -0.8], dtype=torch.float64))

    def forward(self, x):
        s = (x.flatten(1).double() * self.w).sum(1)
        return torch.stack([s, -s], dim=1)


SIGMA = 0.5


def inputs_at(radii):
    """Inputs whose exact smoothed classifier is class 0 with certified radius ``radii``."""
    radii = torch.as_tensor(radii, dtype=torch.float32)
    return radii[:, None] * torch.tensor([0.6, -0.8])[None, :] + torch.tensor([0.4, 0.3])   # (w . offset = 0)


def test_no_level_is_certified_above_the_true_radius_more_often_than_alpha():
    """Inputs whose true radius lies just below the grid radius 0.5 (pA just below p_j): the
    procedure may certify r = 0.5 for at most alpha of them (within binomial error)."""
    alpha, num = 0.2, 300
    smooth = SmoothedClassifier(LinearScore(), 2, sigma=SIGMA, seed=5)
    xs = inputs_at(np.full(num, 0.49))
    certs = smooth.certify_radii(xs, range(num), [0, 0.5], n0=20, n_max=2000, alpha=alpha, batch_size=4000)
    wrong = sum(c.radius >= 0.5 for c in certs)
    assert wrong <= binom.ppf(0.999, num, alpha), wrong
    assert all(c.label == 0 for c in certs)               # level 0 is easy: pA = 0.84
    # where the truth is well above the level, the procedure certifies it, with fewer draws
    above = smooth.certify_radii(inputs_at(np.full(100, 0.9)), range(100), [0, 0.5], n0=20, n_max=2000,
                                 alpha=alpha, batch_size=4000)
    assert sum(c.radius == 0.5 for c in above) >= 95
    assert np.mean([c.n for c in above]) < 1000


def test_the_lower_bound_holds_and_matches_the_certified_level():
    smooth = SmoothedClassifier(LinearScore(), 2, sigma=SIGMA, seed=1)
    true = np.linspace(0.05, 1.2, 60)
    certs = smooth.certify_radii(inputs_at(true), range(60), [0, 0.25, 0.5, 0.75], n0=50, n_max=5000,
                                 alpha=0.001, batch_size=2000)
    for cert, r in zip(certs, true):
        assert cert.pA_lower <= norm.cdf(r / SIGMA)                  # holds (alpha = 0.001)
        if cert.label >= 0:
            assert SIGMA * norm.ppf(cert.pA_lower) >= cert.radius - 1e-9
            assert cert.radius <= r
        assert cert.n <= 5000 and cert.count <= cert.n


def test_at_n_max_the_decision_is_fixed_n_certifys():
    """With futility off, an input whose pA is close to a level runs to n_max; its levels are
    then those the Clopper-Pearson bound at alpha_2 = 0.9 alpha certifies on the same draws
    (the first n_max estimation draws are the fixed-n sample)."""
    alpha, n0, n_max = 0.01, 30, 3000
    smooth = SmoothedClassifier(LinearScore(), 2, sigma=SIGMA, seed=9)
    grid = [0.0, 0.5]
    xs = inputs_at(np.linspace(0.52, 0.57, 12))          # pA around final[1] / n_max = 0.857
    seq = smooth.certify_radii(xs, range(12), grid, n0, n_max, alpha, batch_size=1000, futility=0)
    fixed = smooth.certify_many(xs, range(12), n0, n_max, alpha * 0.9, batch_size=1000)
    reached = 0
    for s, f in zip(seq, fixed):
        if s.n == n_max:
            reached += 1
            assert s.count == f.count
            want = max([r for r in grid if f.label >= 0 and f.radius >= r], default=None)
            assert (s.label, s.radius) == ((f.label, want) if want is not None else (-1, 0.0))
    assert reached >= 4


# ------------------------------------------------------------------ reproducibility
def test_certificates_do_not_depend_on_batch_size_or_packing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    smooth = SmoothedClassifier(model, 4, sigma=0.3, seed=4)
    xs = torch.rand(9, 6)
    run = dict(radii=[0, 0.1, 0.3], n0=40, n_max=4000, alpha=0.01)
    together = smooth.certify_radii(xs, range(9), batch_size=1000, **run)
    assert len({c.n for c in together}) > 2                   # inputs stop at different points
    for batch_size in (64, 300, 5000):
        assert smooth.certify_radii(xs, range(9), batch_size=batch_size, **run) == together
    alone = [smooth.certify_radii(xs[i:i + 1], [i], batch_size=1000, **run)[0] for i in (8, 0, 4)]
    assert alone == [together[8], together[0], together[4]]


def test_bad_settings_are_refused_in_one_line():
    smooth = SmoothedClassifier(LinearScore(), 2, sigma=SIGMA)
    x, run = inputs_at([0.3]), dict(n0=10, n_max=1000, alpha=0.001, batch_size=100)
    for radii, pattern in [([-0.1], "finite and >= 0"), ([float("nan")], "finite and >= 0"),
                           ([], "at least one radius"), (["a"], "numbers"),
                           ([0.5, 5.0], r"radius 5 cannot be certified .* the largest that can is 1\.\d+")]:
        with pytest.raises(DrtFastError, match=pattern):
            smooth.certify_radii(x, [0], radii, **run)
    with pytest.raises(DrtFastError, match="futility"):
        smooth.certify_radii(x, [0], [0], futility=1.0, **run)
    with pytest.raises(DrtFastError, match="n_max must be"):
        smooth.certify_radii(x, [0], [0], 10, 0, 0.001, 100)


def test_discrete_noise_tests_each_level_with_the_tables_slack():
    """--noise discrete: inputs on the grid are certified at radii (each level tested at
    p_j + the table's slack, pA_lower lowered by it); inputs off the grid are refused."""
    smooth = SmoothedClassifier(LinearScore(), 2, sigma=SIGMA, noise="discrete", grid=255)
    xs = torch.round(inputs_at([0.2, 0.9]) * 255) / 255
    certs = smooth.certify_radii(xs, [0, 1], [0, 0.5], n0=20, n_max=2000, alpha=0.01, batch_size=1000)
    assert [c.radius for c in certs] == [0.0, 0.5] and all(c.label == 0 for c in certs)
    settings = sequential.plan(SIGMA, (0.0, 0.5), 20, 2000, 0.01, 0.01, smooth.table.slack(2))
    assert settings.slack > 0 and settings.levels[0] > 0.5
    assert settings.levels[1] >= norm.cdf(0.5 / SIGMA) + settings.slack
    with pytest.raises(DrtFastError, match="grid"):
        smooth.certify_radii(inputs_at([0.2]) + 0.001, [0], [0], n0=20, n_max=2000, alpha=0.01, batch_size=1000)
