"""drt_fast.smoothing: soundness against an exact oracle, agreement with Cohen's loop,
exact reproducibility (noise streams, batch sizes, packing), precision, errors."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm
from torch import nn

from drt_fast import ops, stats
from drt_fast.ensemble import Ensemble
from drt_fast.errors import DrtFastError, NonFiniteLogitsError
from drt_fast.smoothing import PREDICT_STREAM, Certificate, SmoothedClassifier


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ models
class LinearScore(nn.Module):
    """Two classes, logits [s, -s] with s = w.x + b, in float64.

    Under Gaussian noise the smoothed probability of class 0 is Phi(s / (sigma ||w||)), so
    the smoothed classifier's exact certified radius is |s| / ||w||. Computed as an
    elementwise product and a row sum, so a row's output does not depend on its batch.
    """

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=torch.float64))
        self.b = float(b)

    def forward(self, x):
        s = (x.flatten(1).double() * self.w).sum(1) + self.b
        return torch.stack([s, -s], dim=1)


class RowwiseAffine(nn.Module):
    """K-class affine logits in float64 via elementwise products (batch-independent rows)."""

    def __init__(self, d, k, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(k, d, generator=g, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(k, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x):
        return (x.flatten(1).double()[:, None, :] * self.weight).sum(-1) + self.bias


def mlp(d, k, seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, k))


def manual_counts(ens, x, key, seed, first, num, sigma, k):
    """Vote counts [K] of draws first..first+num-1, computed the plain way from the
    reference noise (one batch, torch aggregation, bincount)."""
    draws = ops.reference_noisy_draws(x[None].float(), torch.tensor([key]), torch.tensor([first]),
                                      num, sigma, seed)
    with torch.inference_mode():
        labels = ens.aggregate(ens(draws))
    return np.bincount(labels.numpy(), minlength=k)


# ------------------------------------------------------------------ soundness
SIGMA = 0.5
W = torch.tensor([0.6, -0.8])      # ||w|| = 1, so the true radius is |s|
B = 0.1


def _oracle_inputs(num, seed):
    """Inputs whose exact smoothed margins s / sigma are spread over (0.05, 2.6) sigmas,
    both signs; returns xs [num, 2] and the signed scores s [num]."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.05, 2.6, num) * SIGMA * rng.choice([-1.0, 1.0], num)
    along = (s - B)[:, None] * W.numpy()[None, :]
    across = rng.normal(0, 1, num)[:, None] * np.array([0.8, 0.6])[None, :]   # orthogonal to w
    return torch.tensor(along + across, dtype=torch.float32), s


def test_certificates_are_sound_against_the_exact_linear_oracle():
    num, alpha = 300, 0.05
    xs, s = _oracle_inputs(num, seed=0)
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=3)
    certs = smooth.certify_many(xs, range(num), n0=50, n=1000, alpha=alpha, batch_size=4000)
    true_label = np.where(s > 0, 0, 1)
    true_radius = np.abs(s) / W.norm().item()
    claimed = np.array([c.label != -1 for c in certs])
    wrong = np.array([c.label != -1 and (c.label != t or c.radius > r)
                      for c, t, r in zip(certs, true_label, true_radius)])
    # Each certificate over-claims with probability <= alpha; allow binomial slack.
    assert wrong.sum() <= binom.ppf(0.999, num, alpha), wrong.sum()
    assert claimed.mean() > 0.8                                    # the check is not vacuous
    assert smooth.draws_performed == num * 1050


def test_certified_radius_approaches_the_true_radius_as_n_grows():
    num, alpha = 100, 0.05
    xs, s = _oracle_inputs(num, seed=1)
    true_radius = np.abs(s)
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=4)
    gaps = []
    for n in (100, 400, 1600):
        certs = smooth.certify_many(xs, range(num), n0=50, n=n, alpha=alpha, batch_size=8192)
        radius = np.array([c.radius for c in certs])
        gaps.append(np.mean(true_radius - radius))
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert gaps[2] < 0.5 * gaps[0]


# ------------------------------------------------------------------ Cohen agreement
def cohen_certify(ens, x, n0, n, alpha, sigma, batch_size, k, generator):
    """Cohen's core.py CERTIFY written out: torch.randn noise, per-batch counts on the host."""
    def sample(num):
        counts = np.zeros(k, dtype=np.int64)
        remaining = num
        while remaining:
            this = min(batch_size, remaining)
            remaining -= this
            batch = x[None].repeat(this, *([1] * x.dim()))
            noise = torch.randn(batch.shape, generator=generator) * sigma
            with torch.inference_mode():
                labels = ens.aggregate(ens(batch + noise))
            counts += np.bincount(labels.numpy(), minlength=k)
        return counts

    cA = int(sample(n0).argmax())
    nA = int(sample(n)[cA])
    pA_lower = stats.lower_confidence_bound(nA, n, alpha)
    return (-1, 0.0, pA_lower, nA) if pA_lower < 0.5 else (cA, sigma * norm.ppf(pA_lower), pA_lower, nA)


def test_agrees_with_a_plain_cohen_loop():
    d, k, num, n0, n, alpha, sigma = 8, 4, 30, 64, 2000, 0.001, 0.5
    ens = Ensemble([mlp(d, k, seed) for seed in range(3)], mode="we").eval()
    torch.manual_seed(10)
    xs = torch.rand(num, d) * 2
    smooth = SmoothedClassifier(ens, num_classes=k, sigma=sigma, seed=0)
    ours = smooth.certify_many(xs, range(num), n0=n0, n=n, alpha=alpha, batch_size=4000)
    g = torch.Generator().manual_seed(123)
    theirs = [cohen_certify(ens, x, n0, n, alpha, sigma, 1000, k, g) for x in xs]

    p_hat = np.array([c.count / n for c in ours])
    assert ((p_hat > 0.55) & (p_hat < 0.95)).sum() >= 5            # noise matters: a real test
    compared = 0
    for c, (label, radius, pA_lower, nA) in zip(ours, theirs):
        p_ours, p_theirs = c.count / n, nA / n
        if min(p_ours, p_theirs) > 0.6:                              # confidently classified
            assert c.label == label
        if c.selection_counts.argmax() == label or (c.label == label != -1):
            # Same class counted: the two frequencies are independent estimates of one p.
            p = (p_ours + p_theirs) / 2
            tol = 5 * math.sqrt(2 * p * (1 - p) / n) + 2 / n
            assert abs(p_ours - p_theirs) <= tol
            assert abs(c.pA_lower - pA_lower) <= tol + 0.01
            compared += 1
    assert compared >= num - 3


# ------------------------------------------------------------------ exact reproducibility
def _rowwise_ensemble(d=6, k=3, mode="we"):
    return Ensemble([RowwiseAffine(d, k, seed) for seed in (0, 1)], mode=mode)


def test_counts_come_from_the_documented_noise_streams():
    d, k, sigma, n0, n, seed, key = 6, 4, 0.7, 30, 200, 11, 42
    ens = Ensemble([mlp(d, k, s) for s in range(3)], mode="mme").eval()
    x = torch.rand(d)
    smooth = SmoothedClassifier(ens, num_classes=k, sigma=sigma, seed=seed)
    cert = smooth.certify(x, n0=n0, n=n, alpha=0.01, batch_size=64, key=key)
    # selection: draws 0..n0-1, estimation: draws n0..n0+n-1, of stream `seed`
    np.testing.assert_array_equal(cert.selection_counts,
                                  manual_counts(ens, x, key, seed, 0, n0, sigma, k))
    np.testing.assert_array_equal(cert.estimation_counts,
                                  manual_counts(ens, x, key, seed, n0, n, sigma, k))
    assert cert.count == cert.estimation_counts[cert.selection_counts.argmax()]
    # sample_counts' first_draw picks the same draws: the estimation sample is draws n0.. on
    np.testing.assert_array_equal(smooth.sample_counts(x[None], [key], n, 64, first_draw=n0)[0],
                                  cert.estimation_counts)
    np.testing.assert_array_equal(smooth.sample_counts(x[None], [key], n0, 64)[0],
                                  cert.selection_counts)
    # draw indices run up to 2^32 - 1 inclusive, not further
    last = 2**32 - 1
    np.testing.assert_array_equal(smooth.sample_counts(x[None], [key], 1, 64, first_draw=last)[0],
                                  manual_counts(ens, x, key, seed, last, 1, sigma, k))
    with pytest.raises(DrtFastError, match="below 2\\^32"):
        smooth.sample_counts(x[None], [key], 2, 64, first_draw=last)
    # predict: draws 0..n-1 of stream seed + PREDICT_STREAM
    predict_counts = smooth.sample_counts(x[None], [key], n, 64, stream="predict")[0]
    np.testing.assert_array_equal(predict_counts,
                                  manual_counts(ens, x, key, seed + PREDICT_STREAM, 0, n, sigma, k))
    # another key is another input's noise
    assert not np.array_equal(smooth.sample_counts(x[None], [key + 1], n, 64)[0],
                              smooth.sample_counts(x[None], [key], n, 64)[0])


def test_results_are_identical_across_batch_sizes_and_packing():
    d, k, num, n0, n = 6, 3, 7, 10, 60
    torch.manual_seed(0)
    xs = torch.rand(num, d)
    keys = [5, 0, 17, 3, 99, 1000, 2]
    smooth = SmoothedClassifier(_rowwise_ensemble(d, k), num_classes=k, sigma=0.8, seed=7)
    single = [smooth.certify(x, n0=n0, n=n, alpha=0.01, batch_size=1000, key=key)
              for x, key in zip(xs, keys)]
    assert {c.label for c in single} != {-1}
    for batch_size in (1, 3, 32, 70, 150, 1000):      # 150 and 1000 pack 2 and 14 inputs a batch
        many = smooth.certify_many(xs, keys, n0=n0, n=n, alpha=0.01, batch_size=batch_size)
        assert many == single, batch_size
        for a, b in zip(many, single):
            np.testing.assert_array_equal(a.selection_counts, b.selection_counts)
            np.testing.assert_array_equal(a.estimation_counts, b.estimation_counts)
    # members run as one vmapped call: same certificates
    batched = Ensemble(list(smooth.model.members), mode="we", batch_members=True)
    assert SmoothedClassifier(batched, k, sigma=0.8, seed=7).certify_many(
        xs, keys, n0=n0, n=n, alpha=0.01, batch_size=150) == single
    assert batched._batching_works is True
    # the key, not the position, picks the noise
    assert smooth.certify_many(xs.flip(0), keys[::-1], n0=n0, n=n, alpha=0.01,
                               batch_size=200) == single[::-1]
    predictions = [smooth.predict(x, n=n, alpha=0.01, batch_size=1000, key=key)
                   for x, key in zip(xs, keys)]
    for batch_size in (7, 64, 1000):
        assert smooth.predict_many(xs, keys, n=n, alpha=0.01, batch_size=batch_size) == predictions
    # the inputs as a list of tensors [*S] (one per input), as a user may hold them
    assert smooth.certify_many(list(xs), keys, n0=n0, n=n, alpha=0.01, batch_size=150) == single
    assert smooth.predict_many(tuple(xs), keys, n=n, alpha=0.01, batch_size=64) == predictions
    with pytest.raises(DrtFastError, match="one shape"):
        smooth.certify_many([xs[0], xs[1, :3]], keys[:2], n0=n0, n=n, alpha=0.01, batch_size=150)


def test_predict_follows_the_binomial_test_and_abstains_on_a_tie():
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=0)
    on_boundary = -B * W                                  # s = 0: both classes have p = 1/2
    far = (1.5 - B) * W                                   # s = 1.5 = 3 sigma: class 0
    assert smooth.predict(far, n=500, alpha=0.001, batch_size=128) == 0
    assert smooth.predict(on_boundary, n=500, alpha=0.001, batch_size=128) == -1
    # the decision is exactly the binomial test on the top two counts of the predict stream
    xs = torch.stack([on_boundary + 0.03 * i * W for i in range(12)])
    labels = smooth.predict_many(xs, range(12), n=400, alpha=0.01, batch_size=128)
    counts = smooth.sample_counts(xs, range(12), 400, 128, stream="predict")
    for label, c in zip(labels, counts):
        top = int(c.argmax())
        expect = top if stats.binom_pvalue(c[top], c.sum()) <= 0.01 else -1
        assert label == expect
    assert -1 in labels and 0 in labels


def test_the_bound_uses_the_estimation_count_of_the_class_the_selection_draws_picked():
    """CERTIFY's cA is the top class of the n0 selection draws (ties: the smaller class) and
    its bound is Clopper-Pearson of *cA's* count among the n estimation draws: not the
    estimation sample's own top count, nor a class picked from all draws."""
    num, n0, n, alpha = 40, 6, 100, 0.2
    # s = t along w, t in [-0.3, 0.27]: p(class 0) = Phi(t / sigma) in [0.27, 0.71], so six
    # selection draws often pick (or tie on) the class the estimation draws do not favour
    xs = torch.stack([(-B + 0.015 * (i - 20)) * W for i in range(num)])
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=5)
    certs = smooth.certify_many(xs, range(num), n0=n0, n=n, alpha=alpha, batch_size=256)
    disagree = ties = certified = 0
    for c in certs:
        assert c.selection_counts.sum() == n0 and c.estimation_counts.sum() == n
        selected = int(np.argmax(c.selection_counts))             # first maximum
        assert c.count == c.estimation_counts[selected]
        assert c.pA_lower == stats.lower_confidence_bound(c.count, n, alpha)
        if c.pA_lower < 0.5:
            assert (c.label, c.radius) == (-1, 0.0)
        else:
            assert (c.label, c.radius) == (selected, stats.radius(SIGMA, c.pA_lower))
            certified += 1
        disagree += selected != int(np.argmax(c.estimation_counts))
        ties += c.selection_counts[0] == c.selection_counts[1]
    assert disagree >= 5 and ties >= 3 and certified >= 3            # not vacuous


def test_a_lower_bound_of_exactly_one_half_certifies_radius_zero():
    # Cohen's CERTIFY abstains when pA_lower < 1/2 only. All n draws agreeing give the bound
    # alpha ** (1/n): exactly 1/2 for n = 1, alpha = 1/2 and n = 2, alpha = 1/4.
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=0)
    far = (3.0 - B) * W                                   # s = 6 sigma: every draw votes 0
    for n, alpha in [(1, 0.5), (2, 0.25)]:
        assert stats.lower_confidence_bound(n, n, alpha) == 0.5
        assert smooth.certify(far, n0=1, n=n, alpha=alpha, batch_size=8) == Certificate(0, 0.0, 0.5, n, n)


def test_predict_abstains_only_when_the_p_value_exceeds_alpha():
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=0)
    far = (3.0 - B) * W                                   # s = 6 sigma: every draw votes 0
    p = stats.binom_pvalue(10, 10)                        # 10 of 10: exactly 2 * 0.5^10
    assert p == 2 * 0.5 ** 10
    assert smooth.predict(far, n=10, alpha=p, batch_size=16) == 0
    assert smooth.predict(far, n=10, alpha=p * 0.999, batch_size=16) == -1


class ThreeWay(nn.Module):
    """Logits [x0, x1, 0] in float64: class 2 wins where both coordinates are negative."""

    def forward(self, x):
        x = x.flatten(1).double()
        return torch.stack([x[:, 0], x[:, 1], torch.zeros_like(x[:, 0])], dim=1)


def test_predict_tests_the_top_two_counts_not_the_top_count_against_n():
    # PREDICT's binomial test is nA of nA + nB (the top two), as Cohen's: with a third class
    # holding many votes, nA can be significant against nB while it is not against n.
    n, alpha = 200, 0.05
    grid = [(a, b) for a in np.linspace(-0.4, 0.8, 9) for b in np.linspace(-0.8, 0.4, 7)]
    xs = torch.tensor(grid, dtype=torch.float32)
    smooth = SmoothedClassifier(ThreeWay(), num_classes=3, sigma=1.0, seed=2)
    labels = smooth.predict_many(xs, range(len(grid)), n=n, alpha=alpha, batch_size=512)
    counts = smooth.sample_counts(xs, range(len(grid)), n, 512, stream="predict")
    against_n_differs = 0
    for label, c in zip(labels, counts):
        top, second = np.argsort(-c, kind="stable")[:2]
        p = stats.binom_pvalue(c[top], c[top] + c[second])
        assert label == (int(top) if p <= alpha else -1)
        against_n_differs += (p <= alpha) != (stats.binom_pvalue(c[top], n) <= alpha)
    assert against_n_differs >= 3 and -1 in labels and len(set(labels)) >= 3


def test_certify_abstains_below_one_half():
    smooth = SmoothedClassifier(LinearScore(W, B), num_classes=2, sigma=SIGMA, seed=0)
    cert = smooth.certify(-B * W, n0=20, n=200, alpha=0.001, batch_size=64)
    assert cert == Certificate(-1, 0.0, cert.pA_lower, cert.count, 200)
    assert cert.abstained and cert.pA_lower < 0.5
    cert = smooth.certify((1.0 - B) * W, n0=20, n=200, alpha=0.001, batch_size=64)
    assert cert.label == 0
    assert cert.radius == pytest.approx(SIGMA * norm.ppf(cert.pA_lower))
    assert cert.radius <= stats.max_radius(SIGMA, 200, 0.001)


# ------------------------------------------------------------------ precision, layout
class DtypeProbe(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen, self.autocast = inner, set(), set()

    def forward(self, x):
        self.seen.add(x.dtype)
        cpu = torch.is_autocast_enabled("cpu")
        self.autocast.add(torch.get_autocast_dtype("cpu") if cpu else None)
        return self.inner(x)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_runs_on_cpu_and_mostly_agrees_with_fp32(precision, dtype):
    d, k, num = 8, 4, 24
    probe = DtypeProbe(mlp(d, k, 0))
    ens = Ensemble([probe, mlp(d, k, 1)], mode="we")
    torch.manual_seed(2)
    xs = torch.rand(num, d) * 2
    fp32 = SmoothedClassifier(ens, k, sigma=0.25, seed=0).certify_many(
        xs, range(num), n0=32, n=400, alpha=0.01, batch_size=512)
    assert probe.seen == {torch.float32}
    low = SmoothedClassifier(ens, k, sigma=0.25, seed=0, precision=precision).certify_many(
        xs, range(num), n0=32, n=400, alpha=0.01, batch_size=512)
    assert probe.seen == {torch.float32, dtype}        # the draws were written in low precision
    assert probe.autocast == {None, dtype}             # and the model ran under autocast to it
    agree = sum(a.label == b.label for a, b in zip(fp32, low))
    assert agree >= 0.85 * num
    close = sum(abs(a.pA_lower - b.pA_lower) < 0.1 for a, b in zip(fp32, low))
    assert close >= 0.85 * num


class CloseFloat64Logits(nn.Module):
    """float64 logits [1000, 1000.125]: fp32 holds both, fp16/bf16 round them to a tie."""

    def forward(self, x):
        base = torch.full((x.shape[0], 1), 1000.0, dtype=torch.float64)
        return torch.cat([base, base + 0.125], dim=1) + 0.0 * x.flatten(1).double().sum(1, keepdim=True)


class CountingProbe(nn.Module):
    """Records the batch size of every forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.inner(x)


def test_float64_logits_are_voted_in_float32():
    smooth = SmoothedClassifier(CloseFloat64Logits(), num_classes=2, sigma=0.5, seed=0)
    cert = smooth.certify(torch.zeros(3), n0=10, n=50, alpha=0.01, batch_size=64)
    assert cert.label == 1 and cert.count == 50


def test_certify_many_packs_several_inputs_into_one_forward():
    # n0 + n = 70 draws per input, batch 1000: 14 inputs (980 draws) per forward pass
    probe = CountingProbe(RowwiseAffine(6, 3, seed=0))
    smooth = SmoothedClassifier(probe, 3, sigma=0.5, seed=0, fuse=False)
    smooth.certify_many(torch.rand(20, 6), range(20), n0=10, n=60, alpha=0.01, batch_size=1000)
    assert probe.batches == [980, 420]
    probe.batches.clear()
    smooth.predict_many(torch.rand(5, 6), range(5), n=300, alpha=0.01, batch_size=1000)
    assert probe.batches == [900, 600]


def test_channels_last_does_not_break_cpu():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    xs = torch.rand(4, 2, 4, 4)
    plain = SmoothedClassifier(conv, 3, sigma=0.25, seed=1).certify_many(
        xs, range(4), n0=16, n=100, alpha=0.01, batch_size=256)
    cl = SmoothedClassifier(conv, 3, sigma=0.25, seed=1, channels_last=True).certify_many(
        xs, range(4), n0=16, n=100, alpha=0.01, batch_size=256)
    assert [c.label for c in cl] == [c.label for c in plain]
    assert all(abs(a.count - b.count) <= 2 for a, b in zip(cl, plain))


@pytest.mark.parametrize("channels,expected", [(1, False), (3, True)])
def test_default_layout_is_channels_last_on_cpu_for_three_or_more_channels(channels, expected):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 16, 3))
    smooth = SmoothedClassifier(conv, 3, sigma=0.25, seed=1)
    xs = torch.rand(2, channels, 4, 4)
    smooth.certify_many(xs, range(2), n0=8, n=32, alpha=0.01, batch_size=64)
    if channels == 3:   # (a 1-channel conv weight is channels-last whatever the layout)
        assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert smooth.engine.draws_channels_last(xs.contiguous()) == expected
    # An explicit choice wins.
    assert not SmoothedClassifier(conv, 3, 0.25, channels_last=False).engine.draws_channels_last(xs)


# ------------------------------------------------------------------ errors
class NanAbove(nn.Module):
    """Logits of class 0, NaN where the first pixel exceeds a threshold."""

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3)
        out[:, 0] = 1.0
        out[x[:, 0] > 1.0, 1] = float("nan")
        return out


def test_non_finite_logits_raise():
    smooth = SmoothedClassifier(NanAbove(), 3, sigma=1.0, seed=0)
    with pytest.raises(NonFiniteLogitsError,
                       match=r"NaN/inf logits on \d+ of 110 noisy draws of input 7"):
        smooth.certify(torch.tensor([0.0, 0.0]), n0=10, n=100, alpha=0.01, batch_size=64, key=7)
    with pytest.raises(NonFiniteLogitsError, match="of 100 noisy draws of input 3"):
        smooth.predict(torch.tensor([0.0, 0.0]), n=100, alpha=0.01, batch_size=64, key=3)
    # far below the threshold no draw is NaN
    cert = smooth.certify(torch.tensor([-10.0, 0.0]), n0=10, n=100, alpha=0.01, batch_size=64)
    assert cert.label == 0 and cert.count == 100


def test_bad_arguments_raise_clear_errors():
    model = LinearScore(W, B)
    for kwargs, pattern in [(dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"),
                            (dict(sigma=float("inf")), "sigma"), (dict(seed=2**63), "seed"),
                            (dict(precision="fp64"), "precision"), (dict(seed=-1), "seed"),
                            (dict(num_classes=0), "num_classes")]:
        args = dict(num_classes=2, sigma=0.5) | kwargs
        with pytest.raises(DrtFastError, match=pattern):
            SmoothedClassifier(model, **args)
    smooth = SmoothedClassifier(model, 2, sigma=0.5)
    x = torch.zeros(2)
    good = dict(n0=10, n=100, alpha=0.01, batch_size=32)
    for bad, pattern in [(dict(n=0), "n must be"), (dict(n0=0), "n0 must be"),
                         (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"),
                         (dict(batch_size=0), "batch_size"), (dict(n=2.5), "n must be an integer")]:
        with pytest.raises(DrtFastError, match=pattern):
            smooth.certify(x, **(good | bad))
    with pytest.raises(DrtFastError, match="n must be"):
        smooth.predict(x, n=0, alpha=0.01, batch_size=32)
    # alpha is validated as float(alpha) (like sigma), and that float is what is used
    assert smooth.certify(x, **(good | dict(alpha="0.01")), key=0) == smooth.certify(x, **good, key=0)
    assert (smooth.predict(x, n=100, alpha="0.01", batch_size=32, key=0)
            == smooth.predict(x, n=100, alpha=0.01, batch_size=32, key=0))
    with pytest.raises(DrtFastError, match="expected 2 integer keys"):
        smooth.certify_many(torch.zeros(2, 2), [0], **good)
    for key in ("3", 2**63, 2**64):
        with pytest.raises(DrtFastError, match="keys must be integer dataset indices"):
            smooth.certify(x, **good, key=key)
    with pytest.raises(DrtFastError, match="floating-point"):
        smooth.certify(torch.zeros(2, dtype=torch.int64), **good)
    # a negative key would alias key 2^64 - 1 in the kernels' unsigned key
    with pytest.raises(DrtFastError, match=r"keys \(dataset indices\) must be >= 0, got -1"):
        smooth.certify(x, **good, key=-1)
    with pytest.raises(DrtFastError, match="must be >= 0"):
        smooth.sample_counts(torch.zeros(2, 2), [3, -2], 10, 32)


def test_the_reference_switch_runs_the_whole_engine_on_the_references(monkeypatch):
    """ops.use_reference() (or DRT_FAST_REFERENCE_OPS=1) makes every step of the engine run
    the pure-torch noise and vote -- to tell an engine bug from a kernel bug -- and the
    certificates are the kernels' (bit-identical noise, the same votes)."""
    calls = {"reference_noisy_draws": 0, "reference_vote_": 0}
    for name in calls:
        def spy(*args, _real=getattr(ops.reference, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(ops.reference, name, spy)
    ens = Ensemble([mlp(6, 4, s) for s in range(3)]).eval()
    xs = torch.rand(5, 6)
    run = dict(n0=20, n=230, alpha=0.01, batch_size=100)
    kernels = SmoothedClassifier(ens, 4, sigma=0.5, seed=2, fuse=False).certify_many(xs, range(5), **run)
    assert calls == {"reference_noisy_draws": 0, "reference_vote_": 0}
    with ops.use_reference():
        smooth = SmoothedClassifier(ens, 4, sigma=0.5, seed=2, fuse=False)
        references = smooth.certify_many(xs, range(5), **run)
    steps = 5 * 3                   # 250 draws an input in steps of 100
    assert calls == {"reference_noisy_draws": steps, "reference_vote_": steps}
    assert smooth.draws_performed == 5 * 250
    assert [(c.label, c.count, c.selection_counts.tolist()) for c in references] == \
        [(c.label, c.count, c.selection_counts.tolist()) for c in kernels]


def test_keys_default_to_noise_of_their_own_and_must_be_distinct():
    """Without a key each call draws noise no other call draws (a loop over inputs does not
    certify them all with one noise sample, whose failures would be one event); given keys
    must not repeat within a call."""
    smooth = SmoothedClassifier(RowwiseAffine(2, 4, seed=0), 4, sigma=0.5, seed=1)
    x = torch.full((2,), 0.5)
    args = dict(n0=10, n=400, alpha=0.01, batch_size=64)
    unkeyed = [smooth.certify(x, **args).estimation_counts.tolist() for _ in range(3)]
    assert len({tuple(c) for c in unkeyed}) == 3
    keyed = smooth.certify(x, **args, key=5)
    assert smooth.certify(x, **args, key=5) == keyed                # a key reproduces
    assert len({smooth.predict(x, n=400, alpha=0.5, batch_size=64) for _ in range(20)}) > 1
    with pytest.raises(DrtFastError, match="keys must be distinct.*key 3 repeats"):
        smooth.certify_many(torch.rand(3, 2), [3, 1, 3], **args)
    with pytest.raises(DrtFastError, match="keys must be distinct"):
        smooth.predict_many(torch.rand(2, 2), [0, 0], n=10, alpha=0.01, batch_size=64)


def test_the_radius_uses_the_noise_level_the_kernels_apply():
    """The kernels add float32(sigma) * z: where that is below sigma, radii are computed
    from it (0.12 in float32 is 0.1199999973...)."""
    for sigma in (0.12, 0.25, 0.1):
        applied = float(np.float32(sigma))
        smooth = SmoothedClassifier(LinearScore(W, 10.0), 2, sigma=sigma)
        cert = smooth.certify(torch.zeros(2), n0=10, n=1000, alpha=0.01, batch_size=512, key=0)
        assert cert.radius == min(sigma, applied) * norm.ppf(cert.pA_lower)
        assert cert.radius <= applied * norm.ppf(cert.pA_lower)


def test_the_module_keeps_its_modes_and_inputs_outside_the_pixel_range_are_named():
    member = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    member.train()
    member[2].eval()                                   # a mix of modes, as the user left it
    smooth = SmoothedClassifier(member, 3, sigma=0.25)
    assert member.training and not member[2].training  # construction changes nothing
    calls = []
    member[1].register_forward_hook(lambda m, i, o: calls.append(m.training))
    smooth.certify(torch.rand(4), n0=10, n=100, alpha=0.01, batch_size=64, key=0)
    smooth.predict(torch.rand(4), n=100, alpha=0.01, batch_size=64, key=1)
    assert calls and not any(calls)                    # sampled in eval mode
    assert [m.training for m in member.modules()] == [True, True, True, False, True]
    with pytest.warns(RuntimeWarning, match=r"values in \[0, 255\], outside \[0, 1\]"):
        smooth.certify(torch.tensor([0.0, 255.0, 3.0, 7.0]), n0=10, n=100, alpha=0.01, batch_size=64)


def test_model_output_and_input_shapes_are_checked():
    three = nn.Linear(4, 3)
    with pytest.raises(DrtFastError, match=r"num_classes=5.*got \[64, 3\]"):
        SmoothedClassifier(three, 5, sigma=0.5).certify(torch.zeros(4), n0=4, n=60, alpha=0.01,
                                                        batch_size=64)
    with pytest.raises(DrtFastError, match=r"model failed on noisy inputs of shape \[64, 6\]"):
        SmoothedClassifier(three, 3, sigma=0.5).certify(torch.zeros(6), n0=4, n=60, alpha=0.01,
                                                        batch_size=64)


@pytest.mark.parametrize("fuse", [False, None])
def test_a_model_put_back_in_train_mode_is_sampled_in_eval_mode(fuse):
    """Cohen's core.py calls eval() in every predict/certify: a training loop that certifies
    now and then must not sample with dropout or batch statistics (nor move BatchNorm's
    running statistics), whether or not the members run as fused copies."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    smooth = SmoothedClassifier(model, 3, sigma=0.5, seed=0, fuse=fuse)
    x, args = torch.rand(4), dict(n0=10, n=200, alpha=0.001, batch_size=100, key=1)
    before = smooth.certify(x, **args)
    label = smooth.predict(x, n=200, alpha=0.001, batch_size=100, key=1)
    running = model[1].running_mean.clone()
    model.train()
    after = smooth.certify(x, **args)
    np.testing.assert_array_equal(after.estimation_counts, before.estimation_counts)
    assert after == before
    model.train()
    assert smooth.predict(x, n=200, alpha=0.001, batch_size=100, key=1) == label
    assert torch.equal(model[1].running_mean, running)
    assert model.training                    # the mode it had before the call, restored


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
def test_cuda_certificates_equal_cpu_ones(cuda_device):
    # The noise is bit-identical on CPU and GPU; float64 row-wise logits rounded to fp32
    # for the vote make the counts equal too.
    d, k, num = 6, 3, 5
    torch.manual_seed(0)
    xs = torch.rand(num, d)
    ens = _rowwise_ensemble(d, k, mode="mme")
    cpu = SmoothedClassifier(ens, k, sigma=0.8, seed=7).certify_many(
        xs, range(num), n0=16, n=300, alpha=0.01, batch_size=128)
    gpu = SmoothedClassifier(ens.to(cuda_device), k, sigma=0.8, seed=7).certify_many(
        xs, range(num), n0=16, n=300, alpha=0.01, batch_size=128)
    assert gpu == cpu


def test_cuda_bf16_channels_last_runs(cuda_device):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 64, 4)).to(cuda_device)
    xs = torch.rand(3, 3, 8, 8)
    fp32 = SmoothedClassifier(conv, 4, sigma=0.25, seed=1).certify_many(
        xs, range(3), n0=16, n=200, alpha=0.01, batch_size=256)
    smooth = SmoothedClassifier(conv, 4, sigma=0.25, seed=1, precision="bf16", channels_last=True)
    low = smooth.certify_many(xs, range(3), n0=16, n=200, alpha=0.01, batch_size=256)
    assert smooth.draws_performed == 3 * 216
    assert sum(a.label == b.label for a, b in zip(fp32, low)) >= 2
