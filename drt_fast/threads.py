"""CPU thread count fitted to the cores other processes leave free.

torch takes a thread per core. When another job holds one of them, OpenMP's threads wait
for one another at every barrier and a small model runs several times slower (figures:
bench/RESULTS.md, "Busy cores"). So `certify`, `predict` and `train` on the CPU use only
the cores that no other process keeps busy, unless ``OMP_NUM_THREADS`` says otherwise.
"""
from __future__ import annotations

import os
import time


def fit_threads_to_load() -> str:
    """Use fewer torch threads when other processes keep cores busy (``OMP_NUM_THREADS``
    unset): at least one, never more than torch's. Returns what was done, for the summary
    ('' if nothing)."""
    import torch

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or threads <= 1:
        return ""
    busy = busy_cores()
    if busy is None:
        return ""
    free = max(1, min(threads, len(os.sched_getaffinity(0))) - int(busy + 0.5))
    if free >= threads:
        return ""
    torch.set_num_threads(free)
    return (f"{free} CPU thread{'s' if free != 1 else ''} of {threads}: other processes keep "
            f"{busy:.1f} cores busy; OMP_NUM_THREADS=N chooses")


def busy_cores(window: float = 0.1):
    """How many of the cores this process may run on other processes keep busy now: the
    non-idle share of those CPUs' time over ``window`` seconds (Linux /proc/stat; this process
    sleeps meanwhile), times their count. Not the load average, which still counts a build
    that just ended. None where /proc/stat cannot be read."""
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None

    def ticks():
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or (mine is not None and name not in mine):
                    continue
                values = [int(v) for v in fields[:8]]
                total, idle = total + sum(values), idle + values[3] + values[4]   # idle + iowait
        return total, idle

    try:
        total0, idle0 = ticks()
        time.sleep(window)
        total1, idle1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    cpus = len(mine) if mine else (os.cpu_count() or 1)
    return cpus * (1 - (idle1 - idle0) / (total1 - total0))
