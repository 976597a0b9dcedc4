"""certify --radii (sequential certification, issue 18) through the CLI: rows, summary,
progress bar, resume, bad input."""
import json
import os
import re
import sys

import pytest

from drt_fast import checkpoint, data, embedded, io, stats
from drt_fast.cli import main
from drt_fast.smoothing import SmoothedClassifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import ckpt, one_thread  # noqa: E402,F401 (fixtures; one_thread autouse)


GRID = ["--radii", "0", "0.25", "0.5"]
# 40 inputs, n_max 2000; --batch 200: 2 slots of 100 draws, so 16 inputs a certify_radii call
SEQ = [*GRID, "--n", "2000", "--skip", "10", "--max", "40", "--batch", "200", "--quiet"]


@pytest.fixture(scope="module")
def sequential_tsv(ckpt, tmp_path_factory):
    """An uninterrupted sequential run (`SEQ`) that the resume tests compare against."""
    out = str(tmp_path_factory.mktemp("seq") / "seq.tsv")
    with fx.single_thread():
        assert main(["certify", "--model", ckpt, *SEQ, "--out", out]) == 0
    return out


@pytest.mark.skipif(not (embedded.ASSETS / "default.json").exists(), reason="embedded default not built yet")
def test_sequential_certify_of_the_embedded_default(tmp_path, capsys):
    out = str(tmp_path / "s.tsv")
    assert main(["certify", *GRID, "--n", "2000", "--max", "24", "--out", out]) == 0
    summary = capsys.readouterr().out
    lines = open(out).read().splitlines()
    assert lines[0] == "\t".join(io.CERTIFY_COLUMNS)
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 24
    for r in rows:
        assert r[3] in ("0.0", "0.25", "0.5")                      # the certified grid radius, exactly
        assert 100 <= int(r[8]) <= 2000 and (int(r[8]) % 100 == 0)  # draws used, at decision points
        assert int(r[4]) == int(r[1] == r[2])
    assert any(int(r[8]) < 2000 for r in rows)                      # some inputs stop early
    # one certify_radii call: each row's time is its share of it, by its draws (n0 + n)
    seconds = [sum(x * float(v) for x, v in zip((3600, 60, 1), r[5].split(":"))) for r in rows]
    per_draw = [t / (100 + int(r[8])) for t, r in zip(seconds, rows)]
    assert max(per_draw) - min(per_draw) <= 2e-6 / 200
    # The same certificates as the API, keyed by dataset index.
    default = embedded.load()
    smooth = SmoothedClassifier(checkpoint.load_ensemble(default.model), 10, default.sigma, seed=0)
    test = data.load("npz", "test", default.data)
    keys = [int(r[0]) for r in rows[:6]]
    certs = smooth.certify_radii(test.x[keys], keys, [0, 0.25, 0.5], n0=100, n_max=2000, alpha=0.001,
                                 batch_size=1000)
    for r, cert in zip(rows, certs):
        assert (int(r[2]), float(r[3]), r[6], int(r[7]), int(r[8])) == (
            cert.label, cert.radius, io.format_down(cert.pA_lower), cert.count, cert.n)
    meta = json.load(open(out + ".json"))
    assert (meta["certification"], meta["radii"], meta["futility"], meta["n"]) == (
        "sequential", [0.0, 0.25, 0.5], 0.01, 2000)
    # The summary: the grid, certified accuracy there, ACR a lower bound, draws against fixed n.
    used = sum(100 + int(r[8]) for r in rows)
    assert "sequential certification at radii 0, 0.25, 0.5 (futility test at level 0.01)" in summary
    assert "n0=100, n_max=2000" in summary
    assert re.search(r"^radius\s+0\.00\s+0\.25\s+0\.50$", summary, re.M)
    assert "(a lower bound: each input counts the largest grid radius it certified)" in summary
    assert (f"draws: {used:,} used, {24 * 2100:,} at fixed n (24 x (100 + 2000)): "
            f"{24 * 2100 / used:.2f}x fewer") in summary
    results = io.read_results(out)
    acc = [f"{100 * a:.1f}" for a in stats.certified_accuracy(results.radius, results.correct, [0, 0.25, 0.5])]
    assert re.search(r"^certified accuracy %\s+" + r"\s+".join(map(re.escape, acc)) + "$", summary, re.M)


def test_the_futility_default_is_the_procedures_and_help_says_what_it_costs(capsys):
    from drt_fast import cli, sequential
    from drt_fast.cli import parser

    assert parser.FUTILITY == sequential.FUTILITY
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {sequential.FUTILITY};" in text and "it costs certificates, never soundness" in text


@pytest.mark.parametrize("argv, message", [
    (["certify", "--radii", "0", "-0.25"], "--radii must be finite and >= 0, got -0.25"),
    (["certify", "--radii", "nan"], "--radii must be finite and >= 0, got nan"),
    (["certify", "--radii", "inf"], "--radii must be finite and >= 0, got inf"),
    (["certify", "--radii", "0.25", "5", "--n", "2000"],
     "radius 5 cannot be certified with --n 2000 draws at sigma = 0.25, alpha = 0.001, even at pA = 1: "
     "the largest that can is 0.6"),
    (["predict", "--radii", "0.25"], "--radii is certify's (sequential certification at grid radii); "
                                     "predict certifies no radius"),
    (["predict", "--futility", "0.1"], "--futility is certify's"),
    (["certify", "--radii", "0", "--futility", "1"], "--futility must lie in [0, 1), got 1.0"),
    (["certify", "--radii", "0", "--futility", "-0.1"], "--futility must lie in [0, 1), got -0.1"),
    (["certify", "--radii", "0", "--futility", "nan"], "--futility must lie in [0, 1), got nan"),
    (["certify", "--futility", "0.1"], "--futility sets a test of sequential certification: pass --radii too"),
    (["certify", "--radii"], "argument --radii: expected at least one argument"),
])
def test_bad_sequential_input_is_one_line(ckpt, tmp_path, argv, message, capsys):
    out = tmp_path / "r.tsv"
    assert main([*argv[:1], "--model", ckpt, "--max", "2", "--out", str(out), *argv[1:]]) == 2
    assert message in fx.error_line(capsys)
    assert not out.exists() and not (tmp_path / "r.tsv.json").exists()


def test_sequential_progress_bar_counts_draws_and_ends_full(ckpt, monkeypatch):
    terminal = fx.FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["certify", "--model", ckpt, *GRID, "--n", "2000", "--skip", "90"]) == 0
    last = terminal.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    done, total = re.search(r"(\S+)/(\S+) \[", last).groups()
    assert done == total and "draw/s" in last and "5/5 inputs" in last
    # the bar's total shrank from the fixed-n budget (5 x 2,100 draws) to the draws used
    assert not total.startswith("10.5k")


def test_resume_of_an_interrupted_sequential_run(ckpt, sequential_tsv, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r.tsv")
    real = SmoothedClassifier.certify_radii
    calls = []

    def interrupted(self, xs, keys, *args, **kw):
        calls.append(list(keys))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, xs, keys, *args, **kw)

    monkeypatch.setattr(SmoothedClassifier, "certify_radii", interrupted)
    assert main(["certify", "--model", ckpt, *SEQ, "--out", out]) == 130
    assert "16 new rows kept" in capsys.readouterr().err
    assert [len(c) for c in calls] == [16, 16]
    monkeypatch.undo()
    with open(out) as f:                                        # and the last row cut short
        text = f.read()
    with open(out, "w") as f:
        f.write(text[:-9])
    # another batch size: certificates do not depend on it (decision points are fixed)
    assert main(["certify", "--model", ckpt, *SEQ, "--batch", "700", "--out", out, "--resume"]) == 0
    assert "15 rows were already in the file" in capsys.readouterr().out
    assert fx.rows_without_time(out) == fx.rows_without_time(sequential_tsv)
    meta = json.load(open(out + ".json"))
    assert [(s["first_row"], s["rows"], s["settings"]["batch"]) for s in meta["segments"]] == [
        (0, 15, 200), (15, 25, 700)]
    assert main(["info", out]) == 0
    info = capsys.readouterr().out
    assert "runs           2, whose settings differ (batch 200 / 700)" in info
    assert "rows 1-15 (idx 0-140)" in info and "rows 16-40 (idx 150-390)" in info
    assert main(["analyze", out]) == 0
    assert "written by 2 runs whose settings differ (batch 200 / 700)" in capsys.readouterr().out


def test_a_resume_with_another_grid_or_procedure_is_refused(ckpt, sequential_tsv, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    for suffix in ("", ".json"):
        with open(sequential_tsv + suffix) as src, open(out + suffix, "w") as dst:
            dst.write(src.read())
    before = open(out).read()
    others = ((["--radii", "0", "0.25"], "radii: [0.0, 0.25, 0.5] in the file, [0.0, 0.25] now"),
              (["--futility", "0.1"], "futility: 0.01 in the file, 0.1 now"))
    for change, message in others:
        argv = [a for a in SEQ if a not in GRID[1:] + ["--radii"]] if change[0] == "--radii" else SEQ
        assert main(["certify", "--model", ckpt, *argv, *change, "--out", out, "--resume"]) == 2
        assert message in fx.error_line(capsys)
    fixed = [a for a in SEQ if a not in GRID]
    assert main(["certify", "--model", ckpt, *fixed, "--out", out, "--resume"]) == 2
    assert "certification: 'sequential' in the file, 'fixed-n' now" in fx.error_line(capsys)
    assert open(out).read() == before
