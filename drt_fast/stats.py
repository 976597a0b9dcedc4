"""The statistics of randomized smoothing, exactly as Cohen et al. (2019) compute them.

CERTIFY bounds the top-class probability pA from below with a one-sided Clopper-Pearson
interval and turns the bound into an L2 radius; PREDICT tests whether the top two counts
differ with a two-sided binomial test. Sequential certification (`drt_fast.sequential`)
adds a confidence sequence: the Beta-mixture likelihood ratio, with its count thresholds.
The summary helpers (certified accuracy, ACR) are shared by the engine's tests and
``drt-fast analyze``.
"""
import numpy as np
from scipy.special import betaln, xlog1py, xlogy
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


# ---------------------------------------------------------------- confidence sequences
# What float64 evaluation of the log mixture ratio may be off by, at most (betaln and the
# log terms at N <= 2^32 are good to ~1e-9 absolute): thresholds keep this much in hand.
LOG_MARGIN = 1e-6


def log_mixture_ratio(A, N, p, prior=(0.5, 0.5)):
    """log M_N(p) = log of the ratio of the Beta(a, b) mixture's likelihood of A successes in
    N trials to p's likelihood, elementwise over arrays A, N (``prior`` = (a, b), by default
    Krichevsky-Trofimov's Beta(1/2, 1/2)).

    Under success probability p, M_N(p) is a nonnegative martingale in N with mean 1, so
    P(M_N(p) >= 1/alpha for some N) <= alpha (Ville's inequality).
    """
    A = np.asarray(A, dtype=np.float64)
    N = np.asarray(N, dtype=np.float64)
    a, b = prior
    return betaln(A + a, N - A + b) - betaln(a, b) - xlogy(A, p) - xlog1py(N - A, -p)


def mixture_thresholds(p, Ns, alpha, prior=(0.5, 0.5), above=True):
    """Count thresholds of the mixture test against p at level alpha, one per N in ``Ns``.

    above=True: the smallest A > p*N with log M_N(p) >= log(1/alpha) + LOG_MARGIN (N + 1
    where there is none): from there on the data exclude every p' <= p.
    above=False: the largest A < p*N with that (-1 where there is none): at or below it the
    data exclude every p' >= p.
    """
    Ns = np.asarray(Ns, dtype=np.int64)
    level = np.log(1.0 / alpha) + LOG_MARGIN
    if above:
        lo = np.floor(p * Ns).astype(np.int64) + 1          # A/N > p
        hi = Ns.copy()
    else:
        lo = np.zeros_like(Ns)
        hi = np.ceil(p * Ns).astype(np.int64) - 1           # A/N < p
    empty = lo > hi
    lo, hi = np.minimum(lo, Ns), np.maximum(hi, 0)
    # log M is monotone on each side of p*N: bisect for the first (last) A that passes
    ok_at = (lambda A: log_mixture_ratio(A, Ns, p, prior) >= level)
    if above:
        none = empty | ~ok_at(hi)
        while True:
            todo = lo < hi
            if not todo.any():
                break
            mid = (lo + hi) // 2
            passes = ok_at(mid)
            hi = np.where(todo & passes, mid, hi)
            lo = np.where(todo & ~passes, mid + 1, lo)
        return np.where(none, Ns + 1, lo)
    none = empty | ~ok_at(lo)
    while True:
        todo = lo < hi
        if not todo.any():
            break
        mid = (lo + hi + 1) // 2
        passes = ok_at(mid)
        lo = np.where(todo & passes, mid, lo)
        hi = np.where(todo & ~passes, mid - 1, hi)
    return np.where(none, -1, hi)


def mixture_lower_bound(A, N, alpha, prior=(0.5, 0.5)):
    """A lower bound on p from the confidence sequence {p: M_N(p) < 1/alpha} after A
    successes in N trials: a p at or below the set's lower end (0 when A == 0)."""
    A, N = int(A), int(N)
    if A == 0:
        return 0.0
    level = np.log(1.0 / alpha) + LOG_MARGIN
    lo, hi = 0.0, A / N            # log M_N(lo) = +inf >= level; M is decreasing on (0, A/N)
    if log_mixture_ratio(A, N, hi, prior) >= level:   # (cannot happen: M_N(A/N) is the minimum
        return hi                                     #  and below 1 for the mixture)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if log_mixture_ratio(A, N, mid, prior) >= level:
            lo = mid
        else:
            hi = mid
    return float(lo)


def clopper_pearson_threshold(p, n, alpha, strict=False):
    """The smallest count k with ``lower_confidence_bound(k, n, alpha) >= p`` (``> p`` when
    ``strict``); n + 1 when even k = n is not enough."""
    def passes(k):
        bound = lower_confidence_bound(k, n, alpha)
        return bound > p if strict else bound >= p
    if not passes(n):
        return n + 1
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
