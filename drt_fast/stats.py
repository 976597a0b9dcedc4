"""The statistics of randomized smoothing, exactly as Cohen et al. (2019) compute them.

CERTIFY bounds the top-class probability pA from below with a one-sided Clopper-Pearson
interval and turns the bound into an L2 radius; PREDICT tests whether the top two counts
differ with a two-sided binomial test. The summary helpers (certified accuracy, ACR) are
shared by the engine's tests and ``drt-fast analyze``.
"""
import numpy as np
from scipy.stats import beta, binomtest, norm

from . import validate
from .errors import InvalidArgument


def lower_confidence_bound(k, n, alpha):
    """One-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    Equals ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]`` in Cohen's code:
    the alpha-quantile of Beta(k, n - k + 1), and 0 when k == 0 (where the quantile is
    undefined).
    """
    k, n = int(k), int(n)
    if n < 1:
        raise InvalidArgument(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise InvalidArgument(f"k must lie in [0, n] = [0, {n}], got {k}")
    alpha = validate.alpha(alpha)
    if k == 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def binom_pvalue(nA, n):
    """Two-sided p-value of nA successes out of n trials under p = 1/2 (PREDICT's test).

    PREDICT calls it with ``n = nA + nB``, the top two counts.
    """
    nA, n = int(nA), int(n)
    if n < 1 or not 0 <= nA <= n:
        raise InvalidArgument(f"binom_pvalue needs 0 <= nA <= n and n >= 1, got nA={nA}, n={n}")
    return float(binomtest(nA, n, 0.5).pvalue)


def radius(sigma, pA_lower):
    """Certified L2 radius sigma * Phi^-1(pA_lower) (pixel units, same as sigma).

    Meaningful for pA_lower >= 1/2 (CERTIFY abstains below); 0 at exactly 1/2.
    """
    return float(sigma * norm.ppf(pA_lower))


def max_radius(sigma, n, alpha):
    """The largest radius n draws can certify: sigma * Phi^-1(alpha ** (1/n)).

    That is the radius when all n estimation draws agree (k = n), because the
    Clopper-Pearson bound for k = n is alpha ** (1/n).
    """
    alpha = validate.alpha(alpha)
    if n < 1:
        raise InvalidArgument(f"n must be >= 1, got {n}")
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def certified_accuracy(radii, correct, r):
    """Fraction of rows certified correctly with radius >= r.

    radii: [N] certified radii (0 for abstentions); correct: [N] bool/0-1, whether the
    (non-abstained) prediction equals the label; r: a radius or an array of radii.
    Returns a float for a scalar r, else an array shaped like r.
    """
    radii, correct = _rows(radii, correct)
    r_arr = np.asarray(r, dtype=np.float64)
    hits = correct[None, :] & (radii[None, :] >= r_arr.reshape(-1, 1))
    acc = hits.mean(axis=1) if len(radii) else np.zeros(r_arr.size)
    return float(acc[0]) if r_arr.ndim == 0 else acc.reshape(r_arr.shape)


def acr(radii, correct):
    """Average certified radius: mean over rows of the radius, counting 0 for wrong or
    abstained rows (radii [N], correct [N])."""
    radii, correct = _rows(radii, correct)
    if len(radii) == 0:
        return 0.0
    return float(np.where(correct, radii, 0.0).mean())


def _rows(radii, correct):
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct).reshape(-1).astype(bool)
    if radii.shape != correct.shape:
        raise InvalidArgument(
            f"radii and correct must have the same length, got {radii.size} and {correct.size}")
    return radii, correct
