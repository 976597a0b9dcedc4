"""bench/conftest.py's end-of-run tables (the benchmarks themselves are not run here)."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_conftest(monkeypatch):
    if not (BENCH / "conftest.py").exists():
        pytest.skip("no bench/ beside tests/")
    monkeypatch.syspath_prepend(str(BENCH))   # its `from noise_check import ...`
    spec = importlib.util.spec_from_file_location("bench_conftest", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Reporter:
    def __init__(self):
        self.lines = []

    def section(self, title):
        self.lines.append(f"== {title}")

    def write_line(self, line):
        self.lines.append(line)


def _summary(module, infos):
    session = SimpleNamespace(benchmarks=[SimpleNamespace(extra_info=info) for info in infos])
    reporter = _Reporter()
    module.pytest_terminal_summary(reporter, 0, SimpleNamespace(_benchmarksession=session))
    return reporter.lines


TRAINING = {"train_case": "digits_cnn, batch 64, m=4, cpu", "ratio_drt_over_gaussian": 3.0,
            "gaussian_s": 0.01, "drt_s": 0.03, "peak_MiB": {"gaussian": 3.0, "drt": 11.0}}
RATIO = {"case": "certify digits", "ratio": 2.5, "ref_min_s": 0.5, "ours_min_s": 0.2}


def test_training_cases_alone_get_their_table(bench_conftest):
    # `pytest bench/test_train.py` (and gpu-check's measure step) records no drt-fast /
    # reference ratio: the summary used to fail on max() of no rows
    lines = _summary(bench_conftest, [TRAINING])
    assert not any("reference ratios" in line for line in lines)
    assert any(line.startswith("digits_cnn, batch 64") and "3.00x" in line for line in lines)


def test_ratio_and_training_tables(bench_conftest):
    lines = _summary(bench_conftest, [RATIO, TRAINING])
    assert any("reference ratios" in line for line in lines)
    assert any(line.startswith("certify digits") and "2.50x" in line for line in lines)
    assert any("3.00x" in line for line in lines)
    assert _summary(bench_conftest, []) == []


def test_case_lines_reach_the_terminal_without_dash_s(bench_conftest):
    # plain `pytest bench/` captures a passing case's stdout: its [ratio] / [target] lines
    # are written out as it ends, the rest of what it printed is not
    reporter = _Reporter()
    plugins = SimpleNamespace(get_plugin=lambda name: reporter if name == "terminalreporter" else None)
    bench_conftest.pytest_configure(SimpleNamespace(pluginmanager=plugins))
    out = "\n[ratio] vote_: reference 2 ms / drt-fast 1 ms = 2.00x\nother\n[target] vote_ >= 2x: met\n"
    for when in ("setup", "call", "teardown"):
        bench_conftest.pytest_runtest_logreport(SimpleNamespace(when=when, capstdout=out))
    assert reporter.lines == ["[ratio] vote_: reference 2 ms / drt-fast 1 ms = 2.00x",
                              "[target] vote_ >= 2x: met"]
