"""Sequential certification at fixed radii: anytime-valid, with as few draws as an input needs.

For grid radii r_1 < ... < r_k and an input, CERTIFY's question becomes: for which r_j is
pA > p_j = Phi(r_j / sigma)? (r = 0: pA > 1/2.) The procedure (derivation and guarantee in
docs/sequential.md):

* selection as CERTIFY: the class cA from draws 0 .. n0-1 of the certify stream;
* estimation draws n0, n0+1, ...: the first n_max of them are exactly the fixed-n sample;
  A(N) = draws voting cA among the first N;
* at the decision points N = step, 2 step, ... (a fixed schedule), level j is certified
  once the Beta-mixture likelihood ratio against p_j reaches 1/alpha_1 with A > p_j N
  (`stats.mixture_thresholds`: one confidence sequence serves every level, alpha_1 =
  alpha / 10);
* at n_max, a one-sided Clopper-Pearson bound at alpha_2 = alpha - alpha_1 decides the
  levels left; a false certificate needs the sequence or the final bound to fail:
  probability <= alpha;
* futility: the input stops when the next level can no longer be certified by n_max, or
  when a mixture test at level ``futility`` says pA is below the value at which the final
  bound would just certify it (this only costs certificates, at most ``futility`` of the
  inputs whose pA is at least that value, never soundness).

A certificate is a function of (model, input, key, seed, settings) alone: the decisions
happen at fixed draw counts, whatever the batch size, packing, process count or resume.
"""
import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm

from . import stats, validate
from .engine import Sampler, check_votes
from .errors import InvalidArgument

STEP = 100              # estimation draws between decision points
SEQUENCE_SHARE = 0.1    # alpha_1 = alpha * SEQUENCE_SHARE; alpha_2 = alpha - alpha_1
FUTILITY = 0.01         # level of the futility test (a power cost, never a soundness one)


@dataclass(frozen=True)
class Plan:
    """The count thresholds of the procedure for one (sigma, radii, n0, n_max, alpha, futility).

    levels ``[k]``: p_j (float64, rounded up); points ``[T]``: the decision points N;
    final ``[k]``: the smallest A(n_max) that certifies level j by Clopper-Pearson at
    alpha_2. `rows` gives, for an input whose selection draws gave cA ``s`` votes, the
    thresholds at each point: the smallest A that certifies level j, the largest at which
    level j is given up.
    """
    radii: tuple
    sigma: float
    n0: int
    n_max: int
    alpha: float
    futility: float
    slack: float
    levels: np.ndarray
    points: np.ndarray
    final: np.ndarray
    _rows: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def alpha_sequence(self) -> float:
        return self.alpha * SEQUENCE_SHARE

    @property
    def alpha_final(self) -> float:
        return self.alpha - self.alpha_sequence

    def prior(self, s: int) -> tuple:
        """The mixture's prior for an input whose n0 selection draws gave cA s votes:
        Beta(1/2 + s, 1/2 + n0 - s), Krichevsky-Trofimov's updated by the selection draws
        (fixed before any estimation draw, so the mixture stays a test martingale)."""
        return (0.5 + s, 0.5 + self.n0 - s)

    def rows(self, s: int) -> "Rows":
        rows = self._rows.get(s)
        if rows is None:
            certify = np.stack([stats.mixture_thresholds(p, self.points, self.alpha_sequence, self.prior(s))
                                for p in self.levels])
            futile = np.stack([_futile(j, self.points, certify, self.final, self.n_max, self.futility)
                               for j in range(len(self.radii))])
            rows = self._rows[s] = Rows(len(self.radii), self.n_max, certify.tolist(), self.final.tolist(),
                                        futile.tolist())
        return rows


@dataclass(frozen=True)
class Rows:
    """A plan's thresholds for one prior, as Python lists (read at every decision point)."""
    k: int
    n_max: int
    certify: list
    final: list
    futile: list


def check_radii(radii, sigma, n_max, alpha, name="radii"):
    """Sorted distinct grid radii, each finite, >= 0 and certifiable by n_max draws at pA = 1."""
    try:
        values = sorted({float(r) for r in radii})
    except (TypeError, ValueError):
        raise InvalidArgument(f"{name} must be numbers, got {radii!r}") from None
    if not values:
        raise InvalidArgument(f"{name} must hold at least one radius")
    bad = [r for r in values if not (math.isfinite(r) and r >= 0)]
    if bad:
        raise InvalidArgument(f"{name} must be finite and >= 0, got {bad[0]}")
    largest = stats.max_radius(sigma, n_max, alpha * (1 - SEQUENCE_SHARE))
    if values[-1] > largest:
        raise InvalidArgument(f"radius {values[-1]:g} cannot be certified with n_max = {n_max} draws "
                              f"at sigma = {sigma:g}, alpha = {alpha:g}, even at pA = 1: the largest "
                              f"that can is {math.floor(largest * 1e4) / 1e4:g}")
    return tuple(values)


@functools.lru_cache(maxsize=16)
def plan(sigma: float, radii: tuple, n0: int, n_max: int, alpha: float, futility: float = FUTILITY,
         slack: float = 0.0) -> Plan:
    """The plan for these settings (cached; its thresholds per prior are computed on first use).
    ``slack``: how far the sampled noise's probabilities may be from the smoothing noise's
    (discrete noise's table; 0 for Gaussian noise): each level is tested at p_j + slack."""
    radii = check_radii(radii, sigma, n_max, alpha)
    # p_j (+ slack) rounded up to the next float: certifying pA > p_j (float) is then sound
    # for the real p_j (r = 0 without slack: 1/2 exactly, tested strictly)
    levels = np.array([0.5 if r == 0 and not slack else
                       np.nextafter((0.5 if r == 0 else norm.cdf(r / sigma)) + slack, 1.0) for r in radii])
    points = np.unique(np.append(np.arange(STEP, n_max, STEP, dtype=np.int64), n_max))
    alpha_2 = alpha * (1 - SEQUENCE_SHARE)
    final = np.array([stats.clopper_pearson_threshold(p, n_max, alpha_2, strict=(r == 0))
                      for p, r in zip(levels, radii)])
    return Plan(radii, sigma, n0, n_max, alpha, futility, slack, levels, points, final)


def _futile(j, points, certify, final, n_max, futility):
    """The largest A at each point at which level j is given up: no later point (nor the
    final bound) can be reached even if every further draw votes cA, or the mixture test at
    level ``futility`` puts pA below final[j] / n_max, the value where the final bound would
    just certify level j."""
    # A(N') - N' never grows: level j stays reachable while A - N >= some later need - N'
    need = np.append(certify[j] - points, final[j] - n_max)
    later = np.minimum.accumulate(need[::-1])[::-1][1:]           # over points after t, and n_max
    unreachable = points + later - 1
    hope = min(final[j], n_max) / n_max
    below = stats.mixture_thresholds(hope, points, futility, above=False) if futility > 0 else -1
    return np.maximum(unreachable, below)


@dataclass
class _Input:
    """One input's state while it is certified."""
    key: int
    selection: object = None       # its selection Request
    estimation: object = None      # its estimation Request (extended step by step)
    cA: int = -1
    certified: int = 0             # levels certified (a prefix: 0 .. certified-1)
    n: int = 0                     # estimation draws counted
    count: int = 0                 # A(n)
    rows: Rows = None              # the plan's thresholds for its prior


def certify_radii(engine, xs, keys, settings: Plan, n0: int, batch_size: int, seed: int) -> list:
    """Run the procedure on inputs xs ``[B, *S]`` with keys ``[B]`` (stream ``seed``) -> one
    finished `_Input` per input, in order."""
    reps = min(STEP, batch_size)
    sampler = Sampler(engine, max(1, batch_size // reps), reps)
    states, owner = [], {}
    for x, key in zip(xs, keys):
        state = _Input(key)
        lane = sampler.open(x, key, seed)
        state.selection = lane.request(0, n0)
        state.estimation = lane.request(n0, min(STEP, settings.n_max))
        owner[id(state.estimation)] = state
        states.append(state)
    for finished in sampler.run():
        for request in finished:
            state = owner.get(id(request))
            if state is not None:
                _decide(state, settings)
    return states


def _decide(state: _Input, settings: Plan) -> None:
    """The decision at a point: certify levels, then stop or ask for the next chunk."""
    request = state.estimation
    if state.cA < 0:
        selection = state.selection.counts
        check_votes(selection, state.selection.num_draws, state.key)
        state.cA = int(selection.argmax())                         # ties -> smaller class
        state.rows = settings.rows(int(selection[state.cA]))
    rows = state.rows
    check_votes(request.counts, request.done, state.key)
    state.n = request.done
    state.count = int(request.counts[state.cA])
    t = (state.n - 1) // STEP                  # points: STEP, 2 STEP, ..., n_max
    k = rows.k
    while state.certified < k and state.count >= rows.certify[state.certified][t]:
        state.certified += 1
    if state.n == rows.n_max:
        while state.certified < k and state.count >= rows.final[state.certified]:
            state.certified += 1
    if (state.certified == k or state.n == rows.n_max
            or state.count <= rows.futile[state.certified][t]):
        request.lane.close()
    else:
        request.extend(min(STEP, rows.n_max - state.n))


def lower_bound(state: _Input, settings: Plan) -> float:
    """A lower bound on pA valid at level alpha at the stopping time: the confidence
    sequence's (alpha_1) and, at n_max, the Clopper-Pearson bound's (alpha_2)."""
    s = int(state.selection.counts[state.cA])
    bound = stats.mixture_lower_bound(state.count, state.n, settings.alpha_sequence, settings.prior(s))
    if state.n == settings.n_max:
        bound = max(bound, stats.lower_confidence_bound(state.count, state.n, settings.alpha_final))
    return max(0.0, bound - settings.slack)


def validate_settings(radii, sigma, n0, n_max, alpha, batch_size):
    """The arguments of certify_radii, checked -> (radii, n0, n_max, alpha, batch_size)."""
    n0 = validate.positive_int(n0, "n0")
    n_max = validate.positive_int(n_max, "n_max")
    alpha = validate.alpha(alpha)
    batch_size = validate.positive_int(batch_size, "batch_size")
    validate.draw_range(0, n0 + n_max)
    return check_radii(radii, sigma, n_max, alpha), n0, n_max, alpha, batch_size
