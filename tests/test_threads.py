"""drt_fast.threads: the CPU thread count fitted to the cores other processes leave."""
import os

import torch

from drt_fast import threads


def test_threads_fit_the_cores_other_processes_leave(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(4)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
        monkeypatch.setattr(threads, "busy_cores", lambda: 0.2)        # idle: keep them all
        assert threads.fit_threads_to_load() == "" and torch.get_num_threads() == 4
        monkeypatch.setattr(threads, "busy_cores", lambda: 2.6)
        assert threads.fit_threads_to_load().startswith("1 CPU thread of 4: other processes keep 2.6 cores busy")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setattr(threads, "busy_cores", lambda: 9.0)        # never fewer than one
        threads.fit_threads_to_load()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(4)
        monkeypatch.setenv("OMP_NUM_THREADS", "4")                     # the user's choice stands
        assert threads.fit_threads_to_load() == "" and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_proc_stat():
    busy = threads.busy_cores(0.05)
    if not os.path.exists("/proc/stat"):
        assert busy is None
    else:
        assert 0.0 <= busy <= os.cpu_count() + 0.01
