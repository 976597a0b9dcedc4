"""The discrete noise's distribution: N(0, sigma^2) rounded to a grid, as a table of integers.

For inputs on the grid of step ``1/grid`` (pixels ``v / grid``, v an integer), the discrete
noise of one element is ``I / grid`` with I an integer drawn from the rounded Gaussian

    P(I = i) = Phi((i + 1/2) / s) - Phi((i - 1/2) / s),   s = sigma * grid,

i.e. N(0, sigma^2) rounded to the nearest grid point (Voracek & Hein, ICLR 2023). The
kernels draw I exactly from a 64-bit uniform integer U by integer comparisons only:
``I = -K + #{j : T[j] <= U}`` with the 2K thresholds ``T[j] = round(2^64 F(j - K))``,
``F(i) = Phi((i + 1/2) / s)``, computed once here in 256-bit arithmetic (mpmath). K is the
smallest half-width whose dropped thresholds would all round to 0 (or 2^64).

A guide of 2^g + 1 entries lets the kernels read the count off directly for the uniforms
whose bucket (their top g bits) holds no threshold, all but about 2K / 2^g of them: entry b
is ``G[b] = #{j : T[j] < b * 2^(64 - g)}``, stored as ``~G[b]`` (negative) where bucket b
holds thresholds, which are then scanned. It changes how fast, never what is drawn.

So the noise actually sampled differs from the rounded Gaussian only by the rounding of the
thresholds to 1/2^64 and the tail mass beyond K folded into the end bins: its total
variation distance per element is at most `DiscreteTable.tv_bound` (about 2K / 2^64,
computed here exactly from the table and rounded up). For d elements the sampled noise is
within d * tv_bound of the rounded Gaussian on every event; `slack` gives that bound, which
certification subtracts from pA_lower (docs/certificates.md).
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import validate
from ..errors import InvalidArgument

_PRECISION_BITS = 256      # working precision of the CDF; the table needs 64 bits of it
_MARGIN = 2.0 ** -120      # a bound, per probability, on what 256-bit evaluation can get wrong
HALF_WIDTH_LIMIT = 2**20   # K: tables up to 2 M thresholds (16 MB, built in minutes)


@dataclass(frozen=True, eq=False)
class DiscreteTable:
    """The rounded Gaussian of ``sigma`` (pixel units) on the grid of ``grid`` steps per unit.

    half_width: K, the noise takes the values -K .. K grid steps. thresholds: the 2K
    thresholds T as an int64 tensor holding their uint64 bits (ascending as unsigned).
    guide: int32 ``[2^g + 1]``, `guide_of` the thresholds. tv_bound:
    per-element total variation distance between the sampled noise and the rounded Gaussian
    (an upper bound, as a float rounded up).
    """
    sigma: float
    grid: int
    half_width: int
    thresholds: Tensor
    guide: Tensor
    tv_bound: float
    _on_device: dict = field(default_factory=dict, repr=False)

    def tensors_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(thresholds, guide) on ``device`` (one copy a device, kept)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = (self.thresholds.to(device), self.guide.to(device))
        return self._on_device[device]

    def slack(self, num_elements: int) -> float:
        """Bound on |P_sampled(A) - P_rounded_gaussian(A)| for any event A of a draw of
        ``num_elements`` elements (total variation of a product: at most the sum over
        elements), rounded up."""
        return math.nextafter(num_elements * self.tv_bound, math.inf)

    def probabilities(self) -> list[float]:
        """The sampled probabilities of I = -K .. K (float64, for tests and docs)."""
        t = [int(v) % 2**64 for v in self.thresholds.tolist()]
        edges = [0, *t, 2**64]
        return [(edges[j + 1] - edges[j]) / 2**64 for j in range(len(edges) - 1)]


def discrete_table(sigma: float, grid: int) -> DiscreteTable:
    """The table of the rounded Gaussian of ``sigma`` on the grid of ``grid`` steps per unit
    (built once a process for each pair; a fraction of a second at s = sigma * grid = 255)."""
    return _table(validate.sigma(sigma), validate.grid(grid))


@functools.lru_cache(maxsize=16)
def _table(sigma: float, grid: int) -> DiscreteTable:
    mp = _mpmath()
    with mp.workprec(_PRECISION_BITS):
        s = mp.mpf(sigma) * grid                      # exact: sigma's double times an integer
        one = mp.mpf(2) ** 64

        def cdf(i):                                   # F(i) = P(I <= i) = Phi((i + 1/2) / s)
            return mp.ncdf((mp.mpf(i) + mp.mpf(0.5)) / s)

        half = _half_width(s, cdf, one)
        if half > HALF_WIDTH_LIMIT:
            raise InvalidArgument(f"sigma * grid = {sigma * grid:g} needs a table of {2 * half} thresholds "
                                  f"(at most {2 * HALF_WIDTH_LIMIT}): use a coarser grid")
        # lower half: T[j] = round(2^64 F(j - K)), j < K (i = -K .. -1); the upper half by symmetry,
        # F(i) = 1 - F(-i - 1), so the sampled distribution is exactly symmetric
        low_cdf = [cdf(j - half) for j in range(half)]
        low = [int(mp.nint(one * f)) for f in low_cdf]
        thresholds = low + [2**64 - t for t in reversed(low)]
        tv = _total_variation(thresholds, low_cdf, cdf(-half - 1), mp)
    tensor = torch.tensor([t - 2**64 if t >= 2**63 else t for t in thresholds], dtype=torch.int64)
    return DiscreteTable(sigma, grid, half, tensor, guide_of(thresholds), _round_up(tv, mp))


def guide_bits(n: int) -> int:
    """g for n thresholds: about 2^5 buckets a threshold (so that under n / 2^g ~ 3 % of the
    uniforms need a scan), 2^8 to 2^16 buckets (a guide of at most 256 kB)."""
    return min(16, max(8, math.ceil(math.log2(32 * n))))


def guide_of(thresholds: list) -> Tensor:
    """The guide of ascending thresholds (Python ints in [0, 2^64)): int32 ``[2^g + 1]``,
    g = `guide_bits`, entry b = ``G[b] = #{j : T[j] < b * 2^(64 - g)}`` where bucket b
    (``[b, b + 1) * 2^(64 - g)``) holds no threshold, else ``~G[b]``."""
    bits = guide_bits(len(thresholds))
    step = 2 ** (64 - bits)
    counts = [bisect.bisect_left(thresholds, b * step) for b in range(2**bits + 2)]
    entries = [c if counts[b + 1] == c else ~c for b, c in enumerate(counts[:-1])]
    return torch.tensor(entries, dtype=torch.int32)


def _half_width(s, cdf, one) -> int:
    """The smallest K >= 1 with round(2^64 F(-K-1)) = 0: no dropped threshold is nonzero
    (a bisection: 2^64 F(-K-1) falls as K grows; K is near 9.3 s for any s)."""
    def drops_only_zeros(k):
        return one * cdf(-k - 1) < 0.5

    low, high = 0, max(1, int(math.ceil(float(s) * 10.0)))   # drops_only_zeros(high) holds
    while not drops_only_zeros(high):
        low, high = high, 2 * high
    while high - low > 1:                                     # drops_only_zeros(low) fails (or low = 0)
        mid = (low + high) // 2
        low, high = (low, mid) if drops_only_zeros(mid) else (mid, high)
    return max(1, high)


def _total_variation(thresholds, low_cdf, beyond, mp):
    """(1/2) sum_i |P_sampled(i) - P(i)| over all integers i, with a margin for the precision.

    By symmetry: twice the sum over i < 0 plus the term of i = 0. ``low_cdf[j]`` = F(j - K),
    ``beyond`` = F(-K-1) = P(I < -K) = P(I > K).
    """
    one = mp.mpf(2) ** 64
    half = len(low_cdf)
    total = 2 * beyond                                # the tails beyond +-K: sampled 0
    prev_t, prev_f = 0, beyond
    for j in range(half):                             # i = j - K: sampled (T[j] - T[j-1]) / 2^64
        sampled = (thresholds[j] - prev_t) / one
        total += 2 * abs(sampled - (low_cdf[j] - prev_f))
        prev_t, prev_f = thresholds[j], low_cdf[j]
    sampled_zero = (thresholds[half] - thresholds[half - 1]) / one
    total += abs(sampled_zero - (1 - 2 * low_cdf[-1]))
    return total / 2 + (2 * half + 4) * _MARGIN


def _round_up(value, mp) -> float:
    out = float(value)
    if mp.mpf(out) < value:
        out = math.nextafter(out, math.inf)
    return out


def _mpmath():
    try:
        import mpmath
    except ImportError as exc:  # pragma: no cover - mpmath comes with torch (through sympy)
        raise ImportError("noise='discrete' needs mpmath (pip install mpmath) to build its table") from exc
    return mpmath.mp
