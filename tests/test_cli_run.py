"""Running certify/predict (drt_fast.cli.run, .summary, .progress) end to end, through
main(argv) and a few subprocesses: rows equal to the API, resume, interruption, errors, the
summary and the progress bar."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from drt_fast import checkpoint, data, io, stats
from drt_fast.cli import main
from drt_fast.errors import NonFiniteLogitsError
from drt_fast.smoothing import Certificate, SmoothedClassifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import RUN, ckpt, one_thread, reference_tsv  # noqa: E402,F401 (fixtures; one_thread autouse)


def test_certify_writes_cohen_rows_equal_to_the_api(ckpt, reference_tsv):
    with open(reference_tsv) as f:
        lines = f.read().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tradius\tcorrect\ttime\tpA_lower\tcount\tn"
    rows = [line.split("\t") for line in lines[1:]]
    test = data.load("digits", "test")
    assert [int(r[0]) for r in rows] == list(range(0, 450, 15))
    for r in rows:
        assert int(r[1]) == int(test.y[int(r[0])])
        assert r[3] == io.format_down(float(r[3]))  # never above the radius (issue 19)
        assert re.fullmatch(r"\d+:\d\d:\d\d(\.\d{6})?", r[5])
        assert int(r[4]) == int(r[1] == r[2]) and r[8] == "200"
    # The trained model certifies most inputs: the run is meaningful.
    assert sum(int(r[4]) for r in rows) >= 20
    # Same certificates as the API with key = dataset index.
    ens, _ = checkpoint.load_checkpoint(ckpt)
    smooth = SmoothedClassifier(ens, num_classes=10, sigma=fx.SIGMA, seed=0)
    picks = [0, 7, 29]
    certs = smooth.certify_many(test.x[[15 * i for i in picks]], [15 * i for i in picks],
                                n0=100, n=200, alpha=0.001, batch_size=1000)
    for i, cert in zip(picks, certs):
        assert rows[i][2] == str(cert.label) and rows[i][7] == str(cert.count)
        assert rows[i][6] == io.format_down(cert.pA_lower) and float(rows[i][3]) == cert.radius

    meta = json.load(open(reference_tsv + ".json"))
    for key, value in {"task": "certify", "sigma": 0.25, "n0": 100, "n": 200, "alpha": 0.001, "seed": 0,
                       "mode": "we", "precision": "fp32", "skip": 15, "max": None, "dataset": "digits",
                       "split": "test", "batch": 1000, "device": "cpu"}.items():
        assert meta[key] == value, key
    assert meta["model_sha256"] == io.sha256_file(ckpt)
    assert meta["torch_version"] == torch.__version__ and "drt_fast_version" in meta


def test_predict_rows_are_cohen_predict_layout(ckpt, tmp_path, capsys):
    out = str(tmp_path / "p.tsv")
    # No --quiet: stderr is not a terminal here, so there is no progress bar either.
    assert main(["predict", "--model", ckpt, "--n", "100", "--skip", "45", "--out", out]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "accuracy" in printed.out and "10 inputs" in printed.out
    lines = open(out).read().splitlines()
    assert lines[0] == "idx\tlabel\tpredict\tcorrect\ttime"
    rows = [line.split("\t") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == list(range(0, 450, 45))
    ens, _ = checkpoint.load_checkpoint(ckpt)
    test = data.load("digits", "test")
    labels = SmoothedClassifier(ens, 10, fx.SIGMA, seed=0).predict_many(
        test.x[0:450:45], list(range(0, 450, 45)), n=100, alpha=0.001, batch_size=1000)
    assert [int(r[2]) for r in rows] == labels
    assert all(int(r[3]) == int(r[1] == r[2]) for r in rows)
    assert sum(int(r[3]) for r in rows) >= 7


def test_certify_without_out_prints_summary_and_writes_nothing(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "--model", ckpt, *RUN, "--max", "4"]) == 0
    out = capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    assert "rows not saved: pass --out" in out
    assert "certified accuracy" in out and "ACR" in out and "abstain rate" in out
    assert "inputs/s" in out and "draws/s" in out and "on cpu" in out
    assert ("fused members: on: 2 of 2 member(s) as dense matrices (6 matrices; 2 run by the block-sparse "
            "CPU kernel, 55% of the multiply-adds)") in out
    # Radii up to the largest certifiable one, sigma * Phi^-1(alpha^(1/n)) = 0.456 here.
    assert re.search(r"^radius\s+0\.00\s+0\.25$", out, re.M)


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_unless_quiet(ckpt, monkeypatch, capsys, quiet):
    capsys.readouterr()
    terminal = fx.FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["certify", "--model", ckpt, "--n", "200", "--skip", "90", *(["--quiet"] if quiet else [])]) == 0
    assert ("5/5" in terminal.getvalue()) != quiet
    assert "5/5" not in capsys.readouterr().out  # the bar never goes to stdout


def test_inputs_certified_together_each_get_their_share_of_the_time(ckpt, tmp_path, monkeypatch):
    """item 11: the draws of several inputs share a batch (small n); each row's time is its
    share of the call that certified them, so that the column sums to the time spent."""
    real = SmoothedClassifier.certify_many
    calls = []

    def slow(self, xs, keys, *args, **kw):
        calls.append(list(keys))
        time.sleep(0.3)
        return real(self, xs, keys, *args, **kw)

    monkeypatch.setattr(SmoothedClassifier, "certify_many", slow)
    out = tmp_path / "t.tsv"
    assert main(["certify", "--model", ckpt, *RUN, "--max", "6", "--batch", "900", "--out", str(out)]) == 0
    assert [len(c) for c in calls] == [3, 3]                # 900 // (100 + 200) inputs a call
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    seconds = [float(sum(x * float(v) for x, v in zip((3600, 60, 1), r[5].split(":")))) for r in rows]
    for group in (seconds[:3], seconds[3:]):
        assert len(set(group)) == 1 and 0.1 <= group[0] < 0.3       # a third each, not the call's


def test_a_radius_just_below_025_is_not_counted_at_025(ckpt, tmp_path, monkeypatch, capsys):
    """nA = 84,444 of n = 100,000 at sigma 0.25, alpha 0.001: radius 0.24951, which the file
    held as 0.25 and the summary and analyze counted as certified at 0.25."""
    pA_lower = stats.lower_confidence_bound(84_444, 100_000, 0.001)
    label = int(data.load("digits", "test").y[0])

    def certified(self, xs, keys, n0, n, alpha, batch_size):
        return [Certificate(label, stats.radius(self.radius_sigma, pA_lower), pA_lower, 84_444, n)] * len(keys)

    monkeypatch.setattr(SmoothedClassifier, "certify_many", certified)
    out = str(tmp_path / "r.tsv")
    assert main(["certify", "--model", ckpt, "--max", "1", "--quiet", "--out", out]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"^radius\s+0\.00\s+0\.25\s+0\.50\s+0\.75$", summary, re.M)
    assert re.search(r"^certified accuracy %\s+100\.0\s+0\.0\s+0\.0\s+0\.0$", summary, re.M)
    radius = fx.rows_without_time(out)[1][3]
    assert radius.startswith("0.2495") and float(radius) < 0.25
    assert main(["analyze", out, "--radii", "0.2", "0.25"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^0\.2\s+100\.0$", table, re.M) and re.search(r"^0\.25\s+0\.0$", table, re.M)


def test_certify_many_of_no_inputs_is_empty(ckpt):
    smooth = SmoothedClassifier(checkpoint.load_ensemble(ckpt), 10, 0.25)
    assert smooth.certify_many(torch.zeros(0, 1, 8, 8), [], 10, 100, 0.001, 100) == []
    assert smooth.predict_many(torch.zeros(0, 1, 8, 8), [], 100, 0.001, 100) == []
    assert smooth.certify_many([], [], 10, 100, 0.001, 100) == []


def test_resume_after_a_cut_equals_an_uninterrupted_run(ckpt, reference_tsv, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    with open(reference_tsv) as f:
        lines = f.readlines()
    # A run killed mid-write: 8 whole rows, then half a row.
    with open(out, "w") as f:
        f.writelines(lines[:9])
        f.write(lines[9][:7])
    with open(reference_tsv + ".json") as f:
        meta = json.load(f)
    io.write_json_atomic(out + ".json", meta)
    # A different batch size is fine: results do not depend on it.
    assert main(["certify", "--model", ckpt, *RUN, "--batch", "700", "--out", out, "--resume"]) == 0
    assert "8 rows were already in the file" in capsys.readouterr().out
    assert fx.rows_without_time(out) == fx.rows_without_time(reference_tsv)
    # The sidecar keeps both runs (issue 19, item 6): each its settings and rows.
    segments = json.load(open(out + ".json"))["segments"]
    assert [(s["first_row"], s["rows"], s["idx"], s["settings"]["batch"]) for s in segments] == [
        (0, 8, [0, 105], 1000), (8, 22, [120, 435], 700)]
    assert main(["info", out]) == 0
    assert "runs           2, whose settings differ (batch 1000 / 700)" in capsys.readouterr().out
    assert main(["analyze", out]) == 0
    assert "r.tsv: written by 2 runs whose settings differ (batch 1000 / 700)" in capsys.readouterr().out
    # Resuming a finished file does nothing.
    assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 0
    assert fx.rows_without_time(out) == fx.rows_without_time(reference_tsv)


def test_resume_with_larger_max_extends_the_file(ckpt, reference_tsv, tmp_path):
    out = str(tmp_path / "r.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--max", "5", "--out", out]) == 0
    assert len(fx.rows_without_time(out)) == 6
    assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 0
    assert fx.rows_without_time(out) == fx.rows_without_time(reference_tsv)


def test_existing_out_or_other_configuration_is_refused_and_kept(ckpt, reference_tsv, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    with open(reference_tsv) as f:
        content = f.read()
    with open(out, "w") as f:
        f.write(content)
    with open(reference_tsv + ".json") as f:
        sidecar = f.read()
    with open(out + ".json", "w") as f:
        f.write(sidecar)
    assert main(["certify", "--model", ckpt, *RUN, "--out", out]) == 2
    assert "already exists" in fx.error_line(capsys)
    assert main(["certify", "--model", ckpt, *RUN, "--sigma", "0.5", "--out", out, "--resume"]) == 2
    assert "sigma: 0.25 in the file, 0.5 now" in fx.error_line(capsys)
    assert main(["predict", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 2
    assert "task" in fx.error_line(capsys)
    os.remove(out + ".json")
    assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 2
    assert "metadata file" in fx.error_line(capsys)
    assert open(out).read() == content


def test_resume_refuses_other_data_under_the_same_name(ckpt, tmp_path, capsys):
    """The data is part of a results file's configuration: another .npz (same name, same
    shapes) must not be appended to rows certified on the first."""
    test = data.load("digits", "test")
    first = fx.write_npz(tmp_path / "a.npz", test.x[:40].numpy(), test.y[:40].numpy())
    out = str(tmp_path / "r.tsv")
    argv = ["certify", "--model", ckpt, "--dataset", "npz", "--n", "100", "--quiet", "--out", out]
    assert main([*argv, "--data-dir", first, "--max", "2"]) == 0
    other = fx.write_npz(tmp_path / "a.npz", test.x[40:80].numpy(), test.y[40:80].numpy())
    before = open(out).read()
    assert main([*argv, "--data-dir", other, "--resume"]) == 2
    assert "data_sha256" in fx.error_line(capsys)
    assert open(out).read() == before


def test_resume_of_a_damaged_file(ckpt, reference_tsv, tmp_path, capsys):
    out = str(tmp_path / "r.tsv")
    with open(reference_tsv) as f:
        lines = f.readlines()
    meta_text = open(reference_tsv + ".json").read()
    # a row that is not a results row: one line, the file untouched
    with open(out, "w") as f:
        f.writelines(lines[:4] + ["garbage line here\n"] + lines[5:7])
    with open(out + ".json", "w") as f:
        f.write(meta_text)
    before = open(out).read()
    assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 2
    assert "line 5: expected tab-separated values" in fx.error_line(capsys)
    assert open(out).read() == before
    # a radius that is no number, an idx twice, an input not selected: refused before any work
    for damage in (lines[3].replace(lines[3].split("\t")[3], "nan", 1), lines[3],
                   "999\t" + lines[3].split("\t", 1)[1]):
        with open(out, "w") as f:
            f.writelines(lines[:4] + [damage])
        before = open(out).read()
        assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 2
        assert "cannot resume" in fx.error_line(capsys)
        assert open(out).read() == before
    assert open(out).read() == before
    # killed while writing the header: the resumed run starts the file again
    with open(out, "w") as f:
        f.write(lines[0][:10])
    assert main(["certify", "--model", ckpt, *RUN, "--out", out, "--resume"]) == 0
    assert fx.rows_without_time(out) == fx.rows_without_time(reference_tsv)


def _fail_at(monkeypatch, idx, error):
    """SmoothedClassifier.certify_many raises ``error`` in the call that holds input ``idx``."""
    real = SmoothedClassifier.certify_many

    def failing(self, xs, keys, *args, **kw):
        if idx in list(keys):
            raise error
        return real(self, xs, keys, *args, **kw)

    monkeypatch.setattr(SmoothedClassifier, "certify_many", failing)


def test_nan_logits_error_keeps_the_rows_written(ckpt, tmp_path, monkeypatch, capsys):
    _fail_at(monkeypatch, 90, NonFiniteLogitsError("model produced NaN/inf logits on 300 of 300 noisy draws "
                                                   "of input 90"))
    out = str(tmp_path / "r.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--batch", "300", "--out", out]) == 2
    assert "NaN/inf logits" in fx.error_line(capsys)
    assert [r[0] for r in fx.rows_without_time(out)[1:]] == ["0", "15", "30", "45", "60", "75"]


def test_keyboard_interrupt_exits_130_and_keeps_rows(ckpt, tmp_path, monkeypatch, capsys):
    _fail_at(monkeypatch, 45, KeyboardInterrupt)
    out = str(tmp_path / "r.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--batch", "300", "--out", out]) == 130
    assert "--resume" in capsys.readouterr().err
    assert [r[0] for r in fx.rows_without_time(out)[1:]] == ["0", "15", "30"]


def test_interrupted_before_the_first_row_leaves_no_file(ckpt, tmp_path, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SmoothedClassifier, "certify_many", interrupted)
    out = tmp_path / "r.tsv"
    assert main(["certify", "--model", ckpt, *RUN, "--out", str(out)]) == 130
    assert capsys.readouterr().err == "drt-fast: interrupted\n"
    assert not out.exists() and not (tmp_path / "r.tsv.json").exists()


def test_interrupted_without_out_prints_the_summary_of_the_rows_done(ckpt, monkeypatch, capsys):
    """item 7: Ctrl-C in certify without --out showed nothing of the inputs certified."""
    _fail_at(monkeypatch, 45, KeyboardInterrupt)
    assert main(["certify", "--model", ckpt, *RUN, "--batch", "300"]) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("drt-fast certify: 3 inputs of digits (test)")
    assert "certified accuracy % " in captured.out and "rows not saved" in captured.out
    assert captured.err == "drt-fast: interrupted: the summary covers the 3 inputs done before it\n"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_mid_run_then_resume_gives_the_same_rows(ckpt, tmp_path, sig):
    """SIGKILL or Ctrl-C mid-run leaves only whole rows, which --resume continues. Ctrl-C
    ends with exit 130 and one line that says how many rows were kept."""
    args = ["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", fx.digits_npz(), "--n", "4000",
            "--batch", "500", "--skip", "30", "--quiet"]
    killed = str(tmp_path / "killed.tsv")
    proc = subprocess.Popen([sys.executable, "-m", "drt_fast", *args, "--out", killed],
                            env=fx.subprocess_env(), cwd=fx.NEUTRAL_CWD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(killed) and open(killed).read().count("\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(sig)
    status = proc.wait()
    err = proc.stderr.read().decode().strip().splitlines()
    proc.stderr.close()
    cut = len(fx.rows_without_time(killed)) - 1
    assert 3 <= cut < 15
    if sig == signal.SIGINT:
        assert status == 130
        assert err == [f"drt-fast: interrupted: {cut} new rows kept in {killed}; continue with --resume"]
    assert main([*args, "--out", killed, "--resume"]) == 0
    full = str(tmp_path / "full.tsv")
    assert main([*args, "--out", full]) == 0
    assert fx.rows_without_time(killed) == fx.rows_without_time(full)
    assert len(fx.rows_without_time(full)) == 16


def test_real_nan_model_in_a_subprocess_one_line_no_traceback(tmp_path):
    member = fx.members("digits_cnn", 10, *data.normalization("digits"), 1)[0]
    with torch.no_grad():
        member[1].fc.bias.fill_(float("nan"))
    model = fx.save(tmp_path / "nan.pt", [member], "digits_cnn", "digits", 10, (1, 8, 8),
                    data.normalization("digits"))
    out = tmp_path / "r.tsv"
    proc = fx.run_cli("certify", "--model", model, "--dataset", "npz", "--data-dir", fx.digits_npz(), *RUN,
                      "--out", out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("drt-fast: error: ") and "NaN" in proc.stderr
    # nothing was certified: no header-only file (or sidecar) is left to block a rerun
    assert not out.exists() and not (tmp_path / "r.tsv.json").exists()


def test_cuda_certify_agrees_with_the_cpu_run(ckpt, reference_tsv, cuda_device, tmp_path, capsys):
    """--device cuda: the same noise (bit-identical kernels), so the same certificates up to
    the rare draw whose vote flips with GPU rounding (TF32 convolutions)."""
    out = str(tmp_path / "gpu.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--device", "cuda", "--out", out]) == 0
    # the fixture's members: 2 digits CNNs of 2 convolutions, each followed by a ReLU
    summary = capsys.readouterr().out
    assert "fused members: on: 4 fused convolutions, 0 BatchNorms folded in 2 member(s)" in summary
    assert "CUDA graphs: on: " in summary      # 200 draws x 64 pixels per batch: small
    cpu, gpu = fx.rows_without_time(reference_tsv), fx.rows_without_time(out)
    assert len(gpu) == len(cpu) == 31 and gpu[0] == cpu[0]
    same = [c[:3] == g[:3] for c, g in zip(cpu[1:], gpu[1:])]
    assert sum(same) >= 29, (cpu, gpu)
    for c, g in zip(cpu[1:], gpu[1:]):
        if c[:3] == g[:3]:
            assert abs(float(c[3]) - float(g[3])) < 0.05           # radius
    with open(out + ".json") as f:
        assert json.load(f)["device"].startswith("cuda")
