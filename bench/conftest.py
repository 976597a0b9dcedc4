"""Shared benchmark helpers: run drt-fast and a reference in the same process, report ratios.

Use the ``compare`` fixture in a benchmark test::

    def test_something(compare):
        ratio = compare("noisy_draws 1000x(3,32,32) fp32", ours_fn, ref_fn, rounds=20)

It warms both sides up, runs them alternately ``rounds`` times (pytest-benchmark times
``ours_fn``; ``ref_fn`` is timed in the round's setup), stores ``case``, ``ratio``
(reference time / drt-fast time over the fastest round of each side), ``ref_min_s`` and
``ours_min_s`` in ``benchmark.extra_info`` (so they land in ``--benchmark-json``), prints one
``[ratio]`` line and returns the ratio. One ``compare`` per test (pytest-benchmark allows one
timing per test). Pass ``sync=torch.cuda.synchronize`` for CUDA work.

At the end of the session a table lists every benchmark whose ``extra_info`` holds ``case``
and ``ratio`` -- also those recorded by other helpers (bench/test_certify.py's ``record``) --
and the training cases' DRT / Gaussian step-time ratios (bench/test_train.py). A case whose
median round on either side is over ``NOISY_SPREAD`` times its fastest is marked
(`noise_check`): something else used the cores meanwhile; rerun it.
"""
import os
import time

import pytest
import torch

from noise_check import NOISY_SPREAD, noisy, noisy_note  # noqa: F401 (NOISY_SPREAD: docs)


@pytest.fixture
def compare(benchmark):
    def run(name, ours_fn, ref_fn, rounds=20, sync=None, warmup=2):
        sync = sync or (lambda: None)
        for _ in range(warmup):  # lazy initialisation, allocator, caches
            ref_fn()
            ours_fn()
        sync()
        ref_times, ours_times = [], []

        def timed(fn, times):
            def call():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
            return call

        benchmark.pedantic(timed(ours_fn, ours_times), setup=timed(ref_fn, ref_times), rounds=rounds,
                           iterations=1, warmup_rounds=0)
        ref_s, ours_s = min(ref_times), min(ours_times)
        ratio = ref_s / ours_s
        benchmark.extra_info.update(case=name, ratio=ratio, ref_min_s=ref_s, ours_min_s=ours_s,
                                    threads=torch.get_num_threads(), loadavg_1min=os.getloadavg()[0],
                                    noisy=noisy(ref_times, ours_times))
        print(f"\n[ratio] {name}: reference {ref_s * 1e3:.3f} ms / drt-fast {ours_s * 1e3:.3f} ms = {ratio:.2f}x"
              + noisy_note(ref_times, ours_times))
        return ratio

    return run


# What a case prints for the reader: shown as the case ends even without -s (below).
_CASE_LINES = ("[ratio]", "[target]", "[abs]", "[fuse]", "[share]", "[bandwidth]")
_config = []     # the session's config, for its terminal reporter


def pytest_configure(config):
    _config[:] = [config]


def pytest_runtest_logreport(report):
    """Without -s pytest keeps a passing case's output to itself: its [ratio] / [target] /
    ... lines are written to the terminal here as the case ends (with -s they were printed
    as they came, and nothing was captured)."""
    terminal = _config[0].pluginmanager.get_plugin("terminalreporter") if _config else None
    if report.when != "call" or terminal is None:
        return
    for line in report.capstdout.splitlines():
        if line.startswith(_CASE_LINES):
            terminal.write_line(line)


def pytest_collection_modifyitems(config, items):
    """The case that runs drt-fast's whole-network CIFAR ResNet kernel on a GPU goes last:
    the kernel has not yet run on a GPU, and a fault in it would poison the CUDA context of
    the process, failing every GPU case after it (tests/conftest.py does the same)."""
    items.sort(key=lambda item: item.name.startswith("test_certify_gpu[") and item.name.endswith("-kernel]"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    infos = [bench.extra_info for bench in getattr(session, "benchmarks", None) or []]
    rows = [info for info in infos if "ratio" in info and "case" in info]
    training = [info for info in infos if "ratio_drt_over_gaussian" in info]
    if not rows and not training:
        return
    if rows:   # none when only training cases ran (pytest bench/test_train.py)
        width = max(len(str(row["case"])) for row in rows)
        terminalreporter.section("drt-fast / reference ratios (reference time / drt-fast time, fastest rounds)")
        terminalreporter.write_line(f"{'case':<{width}}  {'ratio':>8}  {'reference':>12}  {'drt-fast':>12}")
    for row in rows:
        ref_s, ours_s = row.get("ref_min_s"), row.get("ours_min_s")
        times = (f"{ref_s * 1e3:>10.3f}ms  {ours_s * 1e3:>10.3f}ms" if ref_s is not None and ours_s is not None
                 else f"{'':>12}  {'':>12}")
        mark = "  (noisy: rerun)" if row.get("noisy") else ""
        terminalreporter.write_line(f"{row['case']:<{width}}  {row['ratio']:>7.2f}x  {times}{mark}")
    if training:
        terminalreporter.section("DRT step time / Gaussian step time, 3 members (target <= 4x)")
        for row in training:
            terminalreporter.write_line(
                f"{row['train_case']:<40}  {row['ratio_drt_over_gaussian']:>7.2f}x  gaussian "
                f"{row['gaussian_s'] * 1e3:.1f} ms, drt {row['drt_s'] * 1e3:.1f} ms, peak MiB {row['peak_MiB']}"
                + ("  (noisy: rerun)" if row.get("noisy") else ""))
    terminalreporter.write_line(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
