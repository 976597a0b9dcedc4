"""CPU thread count fitted to the cores other processes leave free.

torch takes a thread per core. When another job holds one of them, OpenMP's threads wait
for one another at every barrier and a small model runs several times slower (figures:
bench/RESULTS.md, "Busy cores"). So `certify`, `predict` and `train` on the CPU use only
the cores that other processes keep busy throughout a short look, unless
``OMP_NUM_THREADS`` says otherwise. A core is given up only when every one of several
samples finds it busy: a single spike (another process starting, a build's last link)
never costs a thread.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

# How `busy_cores` looks: SAMPLES windows of WINDOW seconds each, the least busy one counts.
SAMPLES = 3
WINDOW = 0.1


def read_proc_stat() -> str:
    """The text of Linux's /proc/stat (OSError elsewhere)."""
    with open("/proc/stat") as f:
        return f.read()


def cpu_times(stat: str, cpus: Optional[set] = None) -> tuple[int, int]:
    """(total, idle) ticks of the CPUs ``cpus`` (names such as ``"cpu0"``; None: all) in a
    /proc/stat text; idle counts idle + iowait."""
    total = idle = 0
    for line in stat.splitlines():
        name, *fields = line.split() or [""]
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and name not in cpus):
            continue
        values = [int(v) for v in fields[:8]]
        total, idle = total + sum(values), idle + values[3] + values[4]
    return total, idle


def busy_cores(window: float = WINDOW, samples: int = SAMPLES,
               read_stat: Callable[[], str] = read_proc_stat,
               sleep: Callable[[float], None] = time.sleep) -> Optional[float]:
    """How many of the cores this process may run on other processes keep busy: the
    non-idle share of those CPUs' time over ``window`` seconds (this process sleeps
    meanwhile), times their count -- the least of ``samples`` consecutive windows, so that
    a spike in one window does not count. Not the load average, which still counts a build
    that just ended. None where the statistics cannot be read."""
    mine = {f"cpu{i}" for i in os.sched_getaffinity(0)} if hasattr(os, "sched_getaffinity") else None
    cpus = len(mine) if mine else (os.cpu_count() or 1)
    least = None
    try:
        before = cpu_times(read_stat(), mine)
        for _ in range(max(1, samples)):
            sleep(window)
            after = cpu_times(read_stat(), mine)
            if after[0] > before[0]:
                busy = cpus * (1 - (after[1] - before[1]) / (after[0] - before[0]))
                least = busy if least is None else min(least, busy)
            before = after
            if least is not None and least < 0.5:     # a core is free: no need to look further
                break
    except (OSError, ValueError, IndexError):
        return None
    return least


def fit_threads_to_load(measure: Callable[[], Optional[float]] = None) -> str:
    """Use fewer torch threads when other processes keep cores busy (``OMP_NUM_THREADS``
    unset): at least one, never more than torch's. ``measure()`` gives the busy cores
    (default: `busy_cores`). Returns what was done, for the summary ('' if nothing)."""
    import torch

    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" in os.environ or threads <= 1:
        return ""
    busy = (measure or busy_cores)()
    if busy is None:
        return ""
    free = max(1, min(threads, len(os.sched_getaffinity(0))) - int(busy + 0.5))
    if free >= threads:
        return ""
    torch.set_num_threads(free)
    return (f"{free} CPU thread{'s' if free != 1 else ''} of {threads}: other processes keep "
            f"{busy:.1f} cores busy; OMP_NUM_THREADS=N chooses")
