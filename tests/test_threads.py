"""drt_fast.threads: the CPU thread count fitted to the cores other processes leave."""
import os

import pytest
import torch

from drt_fast import threads


class FakeStat:
    """/proc/stat texts of cpu0 and cpu1 whose busy share per window of 100 ticks is given."""

    def __init__(self, *windows):
        self.texts, ticks = [], [[0] * 8, [0] * 8]
        for shares in ((0.0, 0.0),) + windows:
            for cpu, share in zip(ticks, shares):
                cpu[0] += round(100 * share)            # user
                cpu[3] += 100 - round(100 * share)      # idle
            self.texts.append("cpu  0 0 0 0 0 0 0 0\n" + "".join(
                f"cpu{i} {' '.join(map(str, t))} 0 0\n" for i, t in enumerate(ticks)) + "intr 1 2 3\n")
        self.reads = 0

    def __call__(self):
        text = self.texts[min(self.reads, len(self.texts) - 1)]
        self.reads += 1
        return text


@pytest.fixture
def two_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def busy(stat, samples=threads.SAMPLES):
    return threads.busy_cores(read_stat=stat, sleep=lambda seconds: None, samples=samples)


def test_a_single_spike_never_costs_a_thread(two_cpus):
    """One window with a core busy, the next ones idle (issue 21, item 10: a one-off 0.9
    cores busy on an idle machine halved the threads)."""
    spike = FakeStat((0.9, 0.0), (0.0, 0.0), (0.0, 0.0))
    assert busy(spike) == 0.0
    assert threads.fit_threads_to_load(lambda: busy(FakeStat((0.9, 0.0), (0.0, 0.0)))) == ""
    assert torch.get_num_threads() == 2


def test_a_core_busy_in_every_sample_is_left_alone(two_cpus):
    held = FakeStat((1.0, 0.1), (0.95, 0.0), (1.0, 0.05))
    assert busy(held) == pytest.approx(0.95)
    assert held.reads == 1 + threads.SAMPLES
    note = threads.fit_threads_to_load(lambda: busy(FakeStat((1.0, 0.1), (0.95, 0.0), (1.0, 0.05))))
    assert note.startswith("1 CPU thread of 2: other processes keep 0.9") and torch.get_num_threads() == 1


def test_an_idle_machine_is_seen_in_one_window(two_cpus):
    idle = FakeStat((0.1, 0.0), (0.9, 0.9))
    assert busy(idle) == pytest.approx(0.1) and idle.reads == 2


def test_unreadable_statistics_change_nothing(two_cpus):
    def unreadable():
        raise OSError("no /proc here")

    assert threads.busy_cores(read_stat=unreadable, sleep=lambda s: None) is None
    assert threads.fit_threads_to_load(lambda: None) == "" and torch.get_num_threads() == 2


def test_threads_fit_the_cores_other_processes_leave(monkeypatch, two_cpus):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
    torch.set_num_threads(4)
    assert threads.fit_threads_to_load(lambda: 0.2) == "" and torch.get_num_threads() == 4   # idle
    assert threads.fit_threads_to_load(lambda: 2.6).startswith(
        "1 CPU thread of 4: other processes keep 2.6 cores busy")
    assert torch.get_num_threads() == 1
    torch.set_num_threads(4)
    threads.fit_threads_to_load(lambda: 9.0)                     # never fewer than one
    assert torch.get_num_threads() == 1
    torch.set_num_threads(4)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")                   # the user's choice stands
    assert threads.fit_threads_to_load(lambda: 2.6) == "" and torch.get_num_threads() == 4


def test_busy_cores_reads_proc_stat():
    found = threads.busy_cores(0.05)
    if not os.path.exists("/proc/stat"):
        assert found is None
    else:
        assert 0.0 <= found <= os.cpu_count() + 0.01
