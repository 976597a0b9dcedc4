"""What a training run says as it goes: the per-epoch log (CSV or JSON lines), the line on
stderr, the progress bar, and the epoch's mean step statistics they report."""
from __future__ import annotations

import csv
import json
import sys

from .config import TrainConfig


class EpochStats:
    """The mean of each step statistic (``ce``, ``gd``, ``cm``, ``acc``) over the steps of
    an epoch that computed it (None where none did)."""

    def __init__(self):
        self.totals = {"ce": 0.0, "gd": 0.0, "cm": 0.0, "acc": 0.0}
        self.counted = dict.fromkeys(self.totals, 0)

    def add(self, stats: dict) -> None:
        for k in self.totals:
            if stats.get(k) is not None:
                self.totals[k] += stats[k]
                self.counted[k] += 1

    def means(self) -> dict:
        return {k: v / self.counted[k] if self.counted[k] else None for k, v in self.totals.items()}


def report(config: TrainConfig, entry: dict, new: bool) -> None:
    """The epoch's ``entry`` in the ``--log`` file (``new``: replacing what it held) and, unless
    ``--quiet``, as a JSON line on stderr."""
    log_line(config.log, entry, new=new)
    if not config.quiet:
        print(json.dumps(entry), file=sys.stderr)


def log_line(path: str | None, record: dict, new: bool = False) -> None:
    """Add ``record`` to the log (``new``: replacing what the file held): a CSV row (a header
    first in a new or empty file; None as an empty field) when ``path`` ends in ``.csv``, else a
    JSON line (None as null)."""
    if not path:
        return
    with open(path, "w" if new else "a", newline="") as fh:
        if path.lower().endswith(".csv"):
            writer = csv.DictWriter(fh, fieldnames=list(record))
            if fh.tell() == 0:
                writer.writeheader()
            writer.writerow(record)
        else:
            fh.write(json.dumps(record) + "\n")


def progress(batches, total: int, config: TrainConfig, group, epoch: int):
    """``batches`` behind a tqdm bar on stderr (main process, a terminal, not ``--quiet``)."""
    if config.quiet or not group.is_main or not sys.stderr.isatty():
        return batches
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                file=sys.stderr)

