"""The rows of a results file: Cohen's columns and formats, drt-fast's extra columns.

``radius`` and ``pA_lower`` are written rounded down (`format_down`): never above the value
computed, and reading one back gives exactly that value (Cohen's ``{:.3}`` rounds to nearest,
which wrote 0.24951 as 0.25).
"""
from __future__ import annotations

import datetime
import decimal
import math

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "pA_lower", "count", "n")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time")
COLUMNS = {"certify": CERTIFY_COLUMNS, "predict": PREDICT_COLUMNS}


def format_time(seconds: float) -> str:
    """Elapsed time as Cohen writes it: ``str(datetime.timedelta)``, e.g. ``0:00:01.234567``."""
    return str(datetime.timedelta(seconds=seconds))


def format_down(value: float) -> str:
    """``value`` (a finite float) as the shortest decimal that is never above it and that
    reads back (``float()``) as ``value`` itself: its exact binary value cut, not rounded,
    after as few significant digits as that takes (0.25 -> ``0.25``, 0.1 -> ``0.1``, 0.3 ->
    ``0.29999999999999998``, 0.2495123... -> its 16-17 digits). Plain notation, never an
    exponent; a whole number keeps a ``.0`` as Python writes floats."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"format_down takes a finite number, got {value}")
    if value == 0:
        return "0.0"
    exact = decimal.Decimal(value)              # the float's exact binary value, in decimal
    for digits in range(1, 40):
        cut = decimal.Context(prec=digits, rounding=decimal.ROUND_FLOOR).plus(exact)
        if float(cut) == value:
            break
    else:                                       # unreachable: 40 digits always read back
        cut = exact
    text = format(cut, "f")
    return text if "." in text else text + ".0"


def certify_row(idx: int, label: int, cert, seconds: float) -> str:
    """One certify row (with newline). ``cert`` has label, radius, pA_lower, count, n;
    radius and pA_lower are written by `format_down` (never above their values)."""
    correct = int(cert.label == label)
    return (f"{idx}\t{label}\t{cert.label}\t{format_down(cert.radius)}\t{correct}\t{format_time(seconds)}"
            f"\t{format_down(cert.pA_lower)}\t{cert.count}\t{cert.n}\n")


def predict_row(idx: int, label: int, prediction: int, seconds: float) -> str:
    """One predict row (with newline), Cohen's ``predict.py`` layout."""
    return f"{idx}\t{label}\t{prediction}\t{int(prediction == label)}\t{format_time(seconds)}\n"
