"""Command-line options that several drt-fast sub-commands share (certify, predict, diagnose)."""
from __future__ import annotations

import argparse
import math

from .errors import DrtFastError


def add_normalization(parser: argparse.ArgumentParser) -> None:
    """``--means`` / ``--sds``: the input normalization of a checkpoint that carries none."""
    parser.add_argument("--means", type=float, nargs="+", metavar="M",
                        help="per-channel means of the input normalization, for a checkpoint that "
                             "carries none (a Cohen/DRT file); default: the data's (a named "
                             "dataset's, an .npz file's means/sds), else its arch's dataset's")
    parser.add_argument("--sds", type=float, nargs="+", metavar="S",
                        help="per-channel standard deviations, with --means")


def normalization(args) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(means, sds)`` from ``--means`` / ``--sds``, or None when neither is given."""
    means, sds = getattr(args, "means", None), getattr(args, "sds", None)
    if means is None and sds is None:
        return None
    if means is None or sds is None:
        raise DrtFastError("--means and --sds go together: pass both, one value per input channel")
    if len(means) != len(sds):
        raise DrtFastError(f"--means and --sds need one value per channel each, got {len(means)} and {len(sds)}")
    if not all(math.isfinite(v) for v in means) or not all(math.isfinite(v) and v > 0 for v in sds):
        raise DrtFastError(f"--means must be finite and --sds finite and > 0, got {means} and {sds}")
    return tuple(means), tuple(sds)


def describe_normalization(source: str, meta: dict, data_name: str) -> str:
    """Where a resolved normalization came from (`checkpoint.resolve_normalization`'s
    answer), in words for the summary."""
    words = {"checkpoint": "the checkpoint's own", "given": "--means/--sds",
             "data": f"the data's ({data_name})",
             "arch": f"{meta.get('dataset')}'s, for arch {meta.get('arch')} (the data states none)"}
    return ", ".join(words.get(part, part) for part in source.split(", "))
