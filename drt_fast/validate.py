"""Checks of user-given values, shared by the Python API, the CLI, the ops and the statistics.

Each check returns the value in its canonical type or raises `InvalidArgument` /
`InvalidArgumentType` with one line naming what was expected and what came. ``name`` is how
the caller's user knows the value (``"n"`` from Python, ``"--n"`` from the CLI).

This module imports no torch: the CLI checks its numbers before loading anything.
"""
import math
import operator

from .errors import InvalidArgument, InvalidArgumentType

# The ensemble aggregation modes (docs/DESIGN.md section 3). Their order is the code each has
# in the compiled kernels (csrc/kernels.h, enum Aggregation).
AGGREGATIONS = ("we", "logit", "mme", "mv")

# Names of the precisions a SmoothedClassifier runs the members in.
PRECISIONS = ("fp32", "bf16", "fp16")

# The smoothing noises (docs/certificates.md): N(0, sigma^2) in floating point, or that
# Gaussian rounded to the inputs' grid and drawn exactly.
NOISES = ("gaussian", "discrete")

# Steps per unit of an input grid (pixels k / grid): grid * pixels and the noise stay exact
# in fp32 (drt_fast/ops/rounded_gaussian.py).
GRID_LIMIT = 2**20

# Draw indices are 32-bit counters of the noise generator: an input's draws are numbered
# 0 .. DRAW_LIMIT - 1, and a larger index would wrap onto another draw's noise.
DRAW_LIMIT = 2**32

# Seeds (and keys) are 63-bit: the noise generator's 64-bit key with room for stream bits.
SEED_LIMIT = 2**63

# A noise stream is the generator's 64-bit key: a user's seed, or a stream derived from it
# (PREDICT's is seed + 2^63, see drt_fast/smoothing.py).
STREAM_LIMIT = 2**64


def int_in_range(value, name, low, high=None):
    """``value`` as an int in ``[low, high)`` (``high`` None: no upper bound)."""
    if isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise InvalidArgumentType(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise InvalidArgument(f"{name} must be {bound}, got {value}")
    return value


def positive_int(value, name):
    """``value`` as an int >= 1."""
    return int_in_range(value, name, 1)


def seed(value, name="seed"):
    """A noise seed, an int in [0, 2^63)."""
    return int_in_range(value, name, 0, SEED_LIMIT)


def stream(value, name="seed"):
    """A noise stream (the generator's key), an int in [0, 2^64)."""
    return int_in_range(value, name, 0, STREAM_LIMIT)


def alpha(value, name="alpha", zero=False):
    """A significance level, a float in (0, 1) -- in [0, 1) with ``zero`` (a test that may
    be switched off)."""
    interval = "[0, 1)" if zero else "(0, 1)"
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentType(f"{name} must be a number in {interval}, got {value!r}") from None
    if not ((0.0 <= result if zero else 0.0 < result) and result < 1.0):
        raise InvalidArgument(f"{name} must lie in {interval}, got {value}")
    return result


def sigma(value, name="sigma"):
    """A noise level, a finite float > 0."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InvalidArgumentType(f"{name} must be a number > 0, got {value!r}") from None
    if not (math.isfinite(result) and result > 0):
        raise InvalidArgument(f"{name} must be a finite number > 0, got {value}")
    return result


def draw_range(first_draw, num_draws, what="draw indices"):
    """Draws ``first_draw .. first_draw + num_draws - 1`` of an input must lie in
    [0, DRAW_LIMIT): the one place this is checked for every device (no device sync)."""
    if first_draw < 0 or first_draw + num_draws > DRAW_LIMIT:
        raise InvalidArgument(f"{what} must be >= 0 and stay below 2^32 (an input's draws are "
                              f"numbered with 32 bits), got draws {first_draw} .. "
                              f"{first_draw + num_draws - 1}")


def one_of(value, choices, name):
    """``value``, one of the names ``choices``."""
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def aggregation(value, name="mode"):
    """An ensemble aggregation mode, one of `AGGREGATIONS`."""
    return one_of(value, AGGREGATIONS, name)


def noise(value, name="noise"):
    """A smoothing noise name, one of `NOISES`."""
    return one_of(value, NOISES, name)


def grid(value, name="grid"):
    """Steps per unit of an input grid, an int in [1, GRID_LIMIT] (the pixels are k / grid)."""
    result = int_in_range(value, name, -2**63, None)
    if not 1 <= result <= GRID_LIMIT:
        raise InvalidArgument(f"{name} must be in [1, 2^20] (steps per unit of the pixels' grid), got {value}")
    return result


def precision(value, name="precision"):
    """A precision name, one of `PRECISIONS`."""
    return one_of(value, PRECISIONS, name)
