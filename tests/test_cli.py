"""drt-fast certify / predict / info end to end, through main(argv) and a few subprocesses."""
import io as io_module
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from drt_fast import checkpoint, data, embedded, io, stats
from drt_fast.cli import main
from drt_fast.errors import NonFiniteLogitsError
from drt_fast.smoothing import Certificate, SmoothedClassifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import RUN, ckpt, one_thread, reference_tsv  # noqa: E402,F401 (fixtures; one_thread autouse)


# ----------------------------------------------------------------------------- certify, predict

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


class _FakeTerminal(io_module.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_a_terminal_unless_quiet(ckpt, monkeypatch, capsys, quiet):
    capsys.readouterr()
    terminal = _FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["certify", "--model", ckpt, "--n", "200", "--skip", "90", *(["--quiet"] if quiet else [])]) == 0
    assert ("5/5" in terminal.getvalue()) != quiet
    assert "5/5" not in capsys.readouterr().out  # the bar never goes to stdout


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


def test_channels_last_flag_certifies_the_same_inputs(ckpt, reference_tsv, tmp_path):
    out = str(tmp_path / "cl.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--channels-last", "--out", out]) == 0
    rows, ref = fx.rows_without_time(out), fx.rows_without_time(reference_tsv)
    assert [r[:3] for r in rows] == [r[:3] for r in ref]      # idx, label, predict
    # Channels-last convolutions may round differently: counts agree to a draw or two.
    assert all(abs(int(a[-2]) - int(b[-2])) <= 2 for a, b in zip(rows[1:], ref[1:]))


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


# ----------------------------------------------------------------------------- other models and data files

def test_cohen_checkpoint_certifies_like_the_same_member(ckpt, tmp_path):
    member = fx.digits_members()[0]
    # Cohen's layout: Sequential(NormalizeLayer, model) under DataParallel, means/sds not in the state dict.
    state = {f"module.{k}": v for k, v in member.state_dict().items() if not k.startswith("0.")}
    cohen = str(tmp_path / "noise_0.25" / "checkpoint.pth.tar")
    os.makedirs(os.path.dirname(cohen))
    torch.save({"arch": "digits_cnn", "state_dict": state, "epoch": 90}, cohen)
    ours = fx.save(tmp_path / "one.pt", [member], "digits_cnn", "digits", 10, (1, 8, 8),
                   data.normalization("digits"))
    a, b = str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv")
    assert main(["certify", "--model", cohen, "--dataset", "digits", *RUN, "--max", "8", "--out", a]) == 0
    assert main(["certify", "--model", ours, *RUN, "--max", "8", "--out", b]) == 0
    assert fx.rows_without_time(a) == fx.rows_without_time(b)
    assert json.load(open(a + ".json"))["sigma"] == 0.25  # from the noise_0.25 folder


def test_drt_member_files_form_one_ensemble(ckpt, reference_tsv, tmp_path, capsys):
    # The DRT code saves one Cohen-format file per member.
    paths = []
    for i, member in enumerate(fx.digits_members()):
        paths.append(str(tmp_path / f"member{i}.pth.tar"))
        torch.save({"arch": "digits_cnn", "state_dict": member.state_dict()}, paths[-1])
    out = str(tmp_path / "m.tsv")
    assert main(["certify", "--model", *paths, "--sigma", "0.25", *RUN, "--max", "8", "--out", out]) == 0
    assert fx.rows_without_time(out) == fx.rows_without_time(reference_tsv)[:9]
    assert json.load(open(out + ".json"))["model"] == paths
    capsys.readouterr()
    assert main(["info", *paths]) == 0
    assert "members        2" in capsys.readouterr().out


def test_version_says_which_kernels_run(capsys):
    import drt_fast
    from drt_fast import ops
    from drt_fast.cli import build_report

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"drt-fast {drt_fast.__version__}"
    assert out[1].startswith(f"torch {torch.__version__} (CUDA build: ")
    ext = ops.extensions()
    assert out[2] == f"CPU kernels: {ext.cpu.cpu_isa()}"
    if ext.cuda is None:
        assert out[3].startswith("CUDA kernels: not built")
    elif not ops.cuda_available():
        assert out[3] == "CUDA kernels: built; no CUDA device answers"
    else:
        assert out[3].startswith(f"CUDA kernels: built for {ext.cuda.architectures()}; ")
        assert torch.cuda.get_device_name(0) in out[3]
    no_cuda = ext._replace(cuda=None, cuda_error=None)        # a build without nvcc
    assert build_report(no_cuda).splitlines()[3].startswith("CUDA kernels: not built")
    broken = no_cuda._replace(cuda_error=ImportError("_C_cuda.so: undefined symbol: x"))
    assert build_report(broken).splitlines()[3] == (
        "CUDA kernels: built, but they fail to load: _C_cuda.so: undefined symbol: x")
    assert build_report(no_cuda._replace(cpu=None)).splitlines()[2].startswith("CPU kernels: not built")


def test_info(ckpt, capsys):
    assert main(["info", ckpt]) == 0
    out = capsys.readouterr().out
    assert "digits_cnn" in out and "members        2" in out


def test_info_of_member_files_shows_each_files_normalization_and_training(tmp_path, capsys):
    """issue 21, item 8: info showed the first file's normalization and trainer for all."""
    from drt_fast.ensemble import Ensemble

    paths = []
    for i, (norm, trainer, sigma) in enumerate(((((0.3052,), (0.376,)), "gaussian", 0.25),
                                                (((0.5,), (0.25,)), "drt", 0.5))):
        paths.append(str(tmp_path / f"m{i}.pt"))
        member = fx.members("digits_cnn", 10, *norm, 1, seed=i)
        checkpoint.save_ensemble(paths[-1], Ensemble(member), arch="digits_cnn", dataset="digits",
                                 num_classes=10, normalization=norm, sigma=sigma,
                                 train_config={"trainer": trainer, "epochs": 3 + i,
                                               "command": f"drt-fast train --trainer {trainer}"})
    cohen = str(tmp_path / "cohen.pth.tar")
    state = fx.members("digits_cnn", 10, (0.0,), (1.0,), 1, seed=5)[0].state_dict()
    torch.save({"arch": "digits_cnn", "state_dict": {k: v for k, v in state.items() if not k.startswith("0.")}},
               cohen)
    assert main(["info", *paths, cohen]) == 0
    out = capsys.readouterr().out.splitlines()
    blocks = [i for i, line in enumerate(out) if line.startswith("member ")]
    assert len(blocks) == 3
    first, second, third = (out[b:e] for b, e in zip(blocks, blocks[1:] + [len(out)]))
    assert first[0].startswith(f"member 0:      {paths[0]} (drt-fast")
    assert "normalization  means [0.3052], sds [0.376]" in first[1] and "sigma          0.25" in first[2]
    assert "trainer=gaussian" in first[3] and "drt-fast train --trainer gaussian" in first[4]
    assert "normalization  means [0.5], sds [0.25]" in second[1] and "sigma          0.5" in second[2]
    assert "trainer=drt" in second[3]
    assert third[0].startswith(f"member 2:      {cohen} (cohen") and "not in the file" in third[1]


def test_default_model_and_data_come_from_the_assets_folder(ckpt, tmp_path, monkeypatch, capsys):
    """The resolution logic, on a stand-in assets folder (the real one is tested below)."""
    assets = tmp_path / "assets"
    assets.mkdir()
    test = data.load("digits", "test")
    rows = list(range(100, 120))
    fx.write_npz(assets / "test.npz", test.x[rows].numpy(), test.y[rows].numpy(), idx=np.array(rows),
                 num_classes=10)
    with open(ckpt, "rb") as src, open(assets / "m.pt", "wb") as dst:
        dst.write(src.read())
    (assets / "default.json").write_text(json.dumps(
        {"model": "m.pt", "data": "test.npz", "sigma": 0.5, "skip": 4, "max": 3, "recipe": "drt-fast train ..."}))
    monkeypatch.setattr(embedded, "ASSETS", assets)
    out = str(tmp_path / "d.tsv")
    assert main(["certify", "--n", "100", "--quiet", "--out", out]) == 0
    assert [r[0] for r in fx.rows_without_time(out)[1:]] == ["100", "104", "108"]
    meta = json.load(open(out + ".json"))
    assert (meta["sigma"], meta["skip"], meta["max"], meta["dataset"]) == (0.5, 4, 3, "npz")
    # Explicit options win over the defaults.
    out2 = str(tmp_path / "d2.tsv")
    assert main(["certify", "--n", "100", "--quiet", "--skip", "10", "--max", "5", "--sigma", "0.25",
                 "--out", out2]) == 0
    assert [r[0] for r in fx.rows_without_time(out2)[1:]] == ["100", "110"]
    assert json.load(open(out2 + ".json"))["sigma"] == 0.25
    # The default subset belongs to the embedded test inputs: data the user names is used whole.
    for i, extra in enumerate((["--dataset", "npz", "--data-dir", str(assets / "test.npz")],
                               ["--dataset", "digits"])):
        out3 = str(tmp_path / f"d3_{i}.tsv")
        assert main(["certify", "--n", "100", "--quiet", "--out", out3] + extra) == 0
        expected = [str(r) for r in rows] if i == 0 else [str(r) for r in range(len(test.y))]
        assert [r[0] for r in fx.rows_without_time(out3)[1:]] == expected
        assert (json.load(open(out3 + ".json"))["skip"], json.load(open(out3 + ".json"))["max"]) == (1, None)
    capsys.readouterr()
    monkeypatch.setattr(embedded, "ASSETS", tmp_path / "empty")
    assert main(["certify", "--n", "100"]) == 2
    assert "--model" in fx.error_line(capsys)


@pytest.mark.skipif(not (embedded.ASSETS / "default.json").exists(), reason="embedded default not built yet")
def test_embedded_default_runs_without_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "--n", "100", "--max", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 inputs" in out and "rows not saved" in out
    assert os.listdir(tmp_path) == []
    assert main(["info"]) == 0
    assert "default.pt" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flag, value, message", [
    ("--n", "0", "--n must be >= 1"),
    ("--n0", "0", "--n0 must be >= 1"),
    ("--alpha", "0", "--alpha must lie in (0, 1)"),
    ("--alpha", "1.5", "--alpha must lie in (0, 1)"),
    ("--alpha", "nan", "--alpha must lie in (0, 1)"),
    ("--sigma", "0", "--sigma must be a finite number > 0"),
    ("--sigma", "-0.25", "--sigma must be a finite number > 0"),
    ("--batch", "0", "--batch must be >= 1"),
    ("--skip", "0", "--skip must be >= 1"),
    ("--max", "0", "--max must be >= 1"),
    ("--seed", "-1", "--seed must be in [0, "),
])
def test_bad_numbers_one_line_before_any_work(flag, value, message, capsys):
    # The model does not exist: the numbers are checked first.
    assert main(["certify", "--model", "/nonexistent.pt", flag, value]) == 2
    assert message in fx.error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["certify", "--mode", "avg"], "argument --mode: invalid choice: 'avg' (choose from 'we', 'logit', "
                                  "'mme', 'mv') (see drt-fast certify --help)"),
    (["certify", "--dataset", "svhn"], "argument --dataset: invalid choice: 'svhn'"),
    (["certify", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["certify", "--n", "abc"], "argument --n/--N: invalid int value: 'abc'"),
    (["predict", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["certify", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:i, got 'tpu'"),
    (["certify", "--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:i, got 'cuda:x'"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line(argv, message, capsys):
    """Unknown choices and malformed values: one line (no usage block), exit 2."""
    assert main(argv) == 2
    assert message in fx.error_line(capsys)


def test_device_cuda_index_is_accepted_by_certify(ckpt, capsys):
    """certify takes cuda:i as train and diagnose do (here: refused for want of a GPU)."""
    status = main(["certify", "--model", ckpt, "--device", "cuda:0", *RUN])
    if torch.cuda.is_available():
        assert status == 0
    else:
        assert status == 2 and "no CUDA device" in fx.error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(ckpt, capsys):
    assert main(["certify", "--model", ckpt, "--device", "cuda", *RUN]) == 2
    assert "no CUDA device" in fx.error_line(capsys)


def test_cuda_graphs_on_the_cpu_are_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    assert main(["certify", "--model", ckpt, "--device", "cpu", "--cuda-graphs", *RUN,
                 "--out", str(out)]) == 2
    assert "--cuda-graphs needs a CUDA device" in fx.error_line(capsys)
    assert not out.exists()


def test_fuse_that_cannot_be_honored_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    from drt_fast import fuse

    monkeypatch.setattr(fuse, "onednn_available", lambda dtype=None: False)   # LeNet's convs stay as they are
    torch.manual_seed(0)
    lenet = fx.save(tmp_path / "lenet.pt", fx.members("lenet", 10, [0.13], [0.31], count=1), "lenet",
                    "mnist", 10, (1, 28, 28), ([0.13], [0.31]))
    npz = fx.write_npz(tmp_path / "m.npz", np.random.rand(3, 1, 28, 28).astype(np.float32),
                       np.arange(3), num_classes=10)
    out = tmp_path / "r.tsv"
    assert main(["certify", "--model", lenet, "--dataset", "npz", "--data-dir", npz, "--device",
                 "cpu", "--fuse", *RUN, "--out", str(out)]) == 2
    assert fx.error_line(capsys) == ("drt-fast: error: --fuse: no member could be rewritten "
                                   "(max_pool2d() is neither affine nor elementwise; "
                                   "this torch build has no oneDNN)")
    assert sorted(os.listdir(tmp_path)) == ["lenet.pt", "m.npz"]           # no results, no sidecar


def test_no_fuse_on_the_cpu_runs_the_members_as_they_are(ckpt, reference_tsv, tmp_path, capsys):
    out = tmp_path / "r.tsv"
    with fx.single_thread():
        assert main(["certify", "--model", ckpt, "--device", "cpu", "--no-fuse", *RUN,
                     "--out", str(out)]) == 0
    assert "fused members: off" in capsys.readouterr().out
    # the reference run used the dense copies: the same certificates, up to a vote that
    # rounding moves across a boundary
    got, want = io.read_results(str(out), "certify"), io.read_results(reference_tsv, "certify")
    assert got.label == want.label
    assert max(abs(a - b) for a, b in zip(got.radius, want.radius)) < 0.01


def test_bad_checkpoints(ckpt, tmp_path, capsys):
    assert main(["certify", "--model", str(tmp_path / "missing.pt"), *RUN]) == 2
    assert "does not exist" in fx.error_line(capsys)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(2000))
    assert main(["certify", "--model", str(corrupt), *RUN]) == 2
    assert "corrupt.pt" in fx.error_line(capsys)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(ckpt, "rb").read()[:5000])
    assert main(["certify", "--model", str(truncated), *RUN]) == 2
    assert "truncated.pt" in fx.error_line(capsys)
    assert main(["info", str(corrupt)]) == 2
    assert "corrupt.pt" in fx.error_line(capsys)


def test_checkpoint_that_does_not_fit_the_data(ckpt, tmp_path, capsys):
    test = data.load("digits", "test")
    three = fx.write_npz(tmp_path / "three.npz", test.x[:6].numpy(), np.arange(6) % 3, num_classes=3)
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", three, *RUN]) == 2
    assert "has 10 classes, the npz data has 3" in fx.error_line(capsys)
    eleven = fx.write_npz(tmp_path / "eleven.npz", test.x[:11].numpy(), np.arange(11))
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", eleven, *RUN]) == 2
    assert "has 11 (its labels; an npz entry num_classes sets the count)" in fx.error_line(capsys)
    big = fx.write_npz(tmp_path / "big.npz", np.zeros((2, 1, 28, 28), np.float32), np.array([0, 9]))
    assert main(["certify", "--model", ckpt, "--dataset", "npz", "--data-dir", big, *RUN]) == 2
    assert "shape" in fx.error_line(capsys)


def test_unwritable_output_fails_before_any_work(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    assert main(["certify", "--model", ckpt, *RUN, "--out", str(blocker / "r.tsv")]) == 2
    assert "cannot write" in fx.error_line(capsys)
    assert main(["certify", "--model", ckpt, *RUN, "--out", str(tmp_path / "no" / "r.tsv")]) == 2
    assert "cannot write" in fx.error_line(capsys)
    assert main(["certify", "--model", ckpt, *RUN, "--resume"]) == 2
    assert "--resume needs --out" in fx.error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["file"] and blocker.read_text() == "keep"


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


def test_closed_stdout_is_no_traceback():
    """`drt-fast info | head -1`: a reader that leaves early gets no traceback on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)                       # every write to stdout now fails (EPIPE)
    proc = subprocess.Popen([sys.executable, "-m", "drt_fast", "info"], stdout=write_end,
                            stderr=subprocess.PIPE, text=True, env=fx.subprocess_env(),
                            cwd=fx.NEUTRAL_CWD)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err == ""


def test_subprocess_bad_number_exit_code():
    proc = fx.run_cli("certify", "--n", "0")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "drt-fast: error: --n must be >= 1, got 0\n"


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


# ----------------------------------------------------------------------------- review fixes

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


def test_warnings_and_out_of_memory_are_one_line(monkeypatch, capsys):
    import warnings

    from drt_fast.cli import info

    def warns(args):
        warnings.warn("drt_fast: something to know\nwith a second line", RuntimeWarning)
        return 0

    def out_of_memory(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "400000000000 bytes.\nmore detail")

    def bug(args):
        raise RuntimeError("an internal error")

    monkeypatch.setattr(info, "run_info", warns)
    assert main(["info"]) == 0
    assert capsys.readouterr().err == "drt-fast: warning: drt_fast: something to know\n"
    monkeypatch.setattr(info, "run_info", out_of_memory)
    assert main(["info"]) == 2
    assert "out of memory (DefaultCPUAllocator" in fx.error_line(capsys)
    monkeypatch.setattr(info, "run_info", bug)
    with pytest.raises(RuntimeError, match="an internal error"):   # bugs keep their traceback
        main(["info"])


def test_usage_errors_name_the_command_and_draw_limit(capsys):
    assert main(["predict", "--n0", "5"]) == 2
    assert fx.error_line(capsys).endswith("unrecognized arguments: --n0 5 (see drt-fast predict --help)")
    assert main(["certify", "--n", str(2**32)]) == 2
    assert "(--n0 + --n of them) must be >= 0 and stay below 2^32" in fx.error_line(capsys)


def test_certify_many_of_no_inputs_is_empty(ckpt):
    smooth = SmoothedClassifier(checkpoint.load_ensemble(ckpt), 10, 0.25)
    assert smooth.certify_many(torch.zeros(0, 1, 8, 8), [], 10, 100, 0.001, 100) == []
    assert smooth.predict_many(torch.zeros(0, 1, 8, 8), [], 100, 0.001, 100) == []
    assert smooth.certify_many([], [], 10, 100, 0.001, 100) == []


def test_interrupted_before_the_first_row_leaves_no_file(ckpt, tmp_path, monkeypatch, capsys):
    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SmoothedClassifier, "certify_many", interrupted)
    out = tmp_path / "r.tsv"
    assert main(["certify", "--model", ckpt, *RUN, "--out", str(out)]) == 130
    assert capsys.readouterr().err == "drt-fast: interrupted\n"
    assert not out.exists() and not (tmp_path / "r.tsv.json").exists()


def test_defaults_are_cohens():
    """Cohen et al.'s certify.py / predict.py defaults: N0 = 100, N = 100000, alpha = 0.001."""
    from drt_fast.cli import build_parser

    certify = build_parser().parse_args(["certify"])
    assert (certify.n0, certify.n, certify.alpha, certify.seed) == (100, 100_000, 0.001, 0)
    predict = build_parser().parse_args(["predict"])
    assert (predict.n, predict.alpha, predict.seed) == (100_000, 0.001, 0)


def test_cohens_spelling_of_n0_and_n(tmp_path, capsys):
    """--N0 / --N as in Cohen et al.'s certify.py and predict.py: the same run as --n0 / --n."""
    runs = {"cohen": ["--N0", "12", "--N", "40"], "ours": ["--n0", "12", "--n", "40"]}
    for name, flags in runs.items():
        assert main(["certify", *flags, "--max", "3", "--quiet", "--out", str(tmp_path / f"{name}.tsv")]) == 0
        assert main(["predict", flags[2], flags[3], "--max", "3", "--quiet",
                     "--out", str(tmp_path / f"{name}-p.tsv")]) == 0
    assert json.loads((tmp_path / "cohen.tsv.json").read_text())["n"] == 40
    for suffix in (".tsv", "-p.tsv"):
        assert (fx.rows_without_time(tmp_path / f"cohen{suffix}")
                == fx.rows_without_time(tmp_path / f"ours{suffix}"))




# ----------------------------------------------------------------------------- normalization (issue 21)

def _cohen_lenet(tmp_path):
    """A Cohen-layout LeNet file (no means/sds in its state dict) whose outputs depend on the
    normalization, and 4 MNIST-shaped inputs."""
    member = fx.members("lenet", 10, (0.0,), (1.0,), 1, seed=3)[0]
    state = {k: v for k, v in member.state_dict().items() if k not in ("0.means", "0.sds")}
    path = tmp_path / "probe.pth.tar"
    torch.save({"arch": "lenet", "state_dict": state}, path)
    x = np.random.default_rng(0).random((4, 1, 28, 28)).astype(np.float32)
    return str(path), x, np.arange(4)


def test_npz_normalization_applies_to_a_checkpoint_that_has_none(tmp_path, capsys):
    model, x, y = _cohen_lenet(tmp_path)
    plain = fx.write_npz(tmp_path / "plain.npz", x, y, num_classes=10)
    normed = fx.write_npz(tmp_path / "probe_norm.npz", x, y, num_classes=10, means=[0.9], sds=[0.1])
    run = ["certify", "--model", model, "--dataset", "npz", "--n0", "10", "--n", "60", "--quiet"]
    outs = {}
    for name, argv in (("plain", ["--data-dir", plain]), ("data", ["--data-dir", normed]),
                       ("flags", ["--data-dir", plain, "--means", "0.9", "--sds", "0.1"])):
        outs[name] = str(tmp_path / f"{name}.tsv")
        assert main([*run, *argv, "--sigma", "0.25", "--out", outs[name]]) == 0
        summary = capsys.readouterr().out
        meta = json.loads(open(outs[name] + ".json").read())
        expected = {"plain": ((0.0,), (1.0,)), "data": ((0.9,), (0.1,)), "flags": ((0.9,), (0.1,))}[name]
        assert (tuple(meta["normalization"]["means"]), tuple(meta["normalization"]["sds"])) == expected
        said = {"plain": "mnist's, for arch lenet", "data": "the data's (probe_norm.npz)", "flags": "--means/--sds"}
        assert said[name] in meta["normalization_source"]
        assert f"normalization: means [{expected[0][0]}], sds [{expected[1][0]}] ({meta['normalization_source']})" \
            in summary
    rows = {name: fx.rows_without_time(path) for name, path in outs.items()}
    assert rows["data"] == rows["flags"] != rows["plain"]
    # a resume with another normalization is another configuration
    assert main([*run, "--data-dir", plain, "--sigma", "0.25", "--out", outs["plain"], "--resume",
                 "--means", "0.5", "--sds", "0.5"]) == 2
    assert "normalization" in fx.error_line(capsys)


def test_a_checkpoints_own_normalization_wins(ckpt, tmp_path, capsys):
    test = data.load("digits", "test")
    rows = list(range(0, 60, 15))
    own = fx.write_npz(tmp_path / "own.npz", test.x[rows].numpy(), test.y[rows].numpy(), idx=np.array(rows),
                       num_classes=10)
    other = fx.write_npz(tmp_path / "other.npz", test.x[rows].numpy(), test.y[rows].numpy(), idx=np.array(rows),
                         num_classes=10, means=[0.9], sds=[0.1])
    run = ["certify", "--model", ckpt, "--dataset", "npz", "--n", "200", "--quiet"]
    assert main([*run, "--data-dir", own, "--out", str(tmp_path / "a.tsv")]) == 0
    assert main([*run, "--data-dir", other, "--out", str(tmp_path / "b.tsv")]) == 0
    assert "(the checkpoint's own)" in capsys.readouterr().out
    assert fx.rows_without_time(tmp_path / "a.tsv") == fx.rows_without_time(tmp_path / "b.tsv")
    # setting another one explicitly is a conflict, said in one line before any output
    assert main([*run, "--data-dir", own, "--means", "0.9", "--sds", "0.1", "--out", str(tmp_path / "c.tsv")]) == 2
    assert "carries its own normalization" in fx.error_line(capsys)
    assert not (tmp_path / "c.tsv").exists()
    for bad in (["--means", "0.5"], ["--means", "0.5", "--sds", "0"], ["--means", "0.5", "0.5", "--sds", "1"]):
        assert main([*run, "--data-dir", own, *bad]) == 2
        assert "--means" in fx.error_line(capsys)


# ----------------------------------------------------------------------------- issue 21: friction

def test_data_without_model_says_the_default_is_a_digits_model(tmp_path, capsys):
    """item 2: --data-dir without --model fell back to the digits model with puzzling errors."""
    mnist = fx.write_mnist(tmp_path / "mnist", np.zeros((2, 28, 28), np.uint8), np.array([1, 2], np.uint8))
    odd = fx.write_npz(tmp_path / "odd.npz", np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]))
    for argv in (["--data-dir", mnist], ["--dataset", "mnist", "--data-dir", mnist], ["--dataset", "cifar10"],
                 ["--dataset", "npz", "--data-dir", odd], ["--data-dir", odd]):
        assert main(["certify", *argv, *RUN]) == 2
        assert fx.error_line(capsys).startswith(
            "drt-fast: error: no --model given: the embedded default is a digits model"), argv


def test_fp16_on_the_cpu_warns_and_points_to_bf16(ckpt, capsys):
    """item 3: fp16 on the CPU is many times slower than fp32, with only a fusion note."""
    assert main(["certify", "--model", ckpt, "--device", "cpu", "--precision", "fp16", *RUN, "--max", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("drt-fast: warning: --precision fp16 on the CPU runs many times slower")
               and "--precision bf16" in line for line in err), err
    assert main(["certify", "--model", ckpt, "--device", "cpu", "--precision", "bf16", *RUN, "--max", "1"]) == 0
    assert "fp16" not in capsys.readouterr().err


def test_interrupted_without_out_prints_the_summary_of_the_rows_done(ckpt, monkeypatch, capsys):
    """item 7: Ctrl-C in certify without --out showed nothing of the inputs certified."""
    _fail_at(monkeypatch, 45, KeyboardInterrupt)
    assert main(["certify", "--model", ckpt, *RUN, "--batch", "300"]) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("drt-fast certify: 3 inputs of digits (test)")
    assert "certified accuracy % " in captured.out and "rows not saved" in captured.out
    assert captured.err == "drt-fast: interrupted: the summary covers the 3 inputs done before it\n"


def test_cohen_style_positional_arguments_name_the_flags(capsys):
    """item 11: `drt-fast certify cifar10 ckpt 0.25 out.txt` got a bare 'unrecognized arguments'."""
    assert main(["certify", "cifar10", "ckpt.pth.tar", "0.25", "out.txt"]) == 2
    line = fx.error_line(capsys)
    assert "unrecognized arguments: cifar10 ckpt.pth.tar 0.25 out.txt" in line
    assert "--dataset --model --sigma --out" in line
    assert main(["predict", "--frobnicate"]) == 2
    assert "--dataset --model" not in fx.error_line(capsys)


def test_shape_and_class_mismatches_say_how_to_fix_them(tmp_path, capsys):
    """item 11: an N, H, W, C npz, and a 1000-class model on a 3-class folder subset."""
    torch.manual_seed(0)
    r20 = fx.save(tmp_path / "r20.pt", fx.members("cifar_resnet20", 10, *data.normalization("cifar10"), 1),
                  "cifar_resnet20", "cifar10", 10, (3, 32, 32), data.normalization("cifar10"))
    hwc = fx.write_npz(tmp_path / "hwc.npz", np.zeros((2, 32, 32, 3), np.float32), np.array([0, 1]))
    assert main(["certify", "--model", r20, "--dataset", "npz", "--data-dir", hwc, *RUN]) == 2
    assert fx.error_line(capsys).endswith("transpose it to N, C, H, W (x.transpose(0, 3, 1, 2))")
    pytest.importorskip("PIL")
    from PIL import Image

    for wnid in ("n01", "n02", "n03"):                     # 3 of the model's 10 classes
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "imagenet" / "val" / wnid / "a.png")
    big = fx.save(tmp_path / "r50.pt", fx.members("resnet50", 10, *data.normalization("imagenet"), 1),
                  "resnet50", "imagenet", 10, (3, 224, 224), data.normalization("imagenet"))
    assert main(["certify", "--model", big, "--dataset", "imagenet", "--data-dir", str(tmp_path / "imagenet"),
                 *RUN]) == 2
    line = fx.error_line(capsys)
    assert "has 10 classes, the imagenet data has 3" in line
    assert "keep all its class folders" in line and "num_classes=10" in line


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


# ----------------------------------------------------------------------------- sequential certification (issue 18)

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


def test_sequential_progress_bar_counts_draws_and_ends_full(ckpt, monkeypatch):
    terminal = _FakeTerminal()
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


# ----------------------------------------------------------------------------- issue 19, items 1 and 6

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


def test_info_of_a_results_file_and_of_a_file_without_sidecar(ckpt, reference_tsv, tmp_path, capsys):
    assert main(["info", reference_tsv]) == 0
    out = capsys.readouterr().out
    assert f"results        {reference_tsv}: certify, 30 rows" in out
    assert "certification  fixed n: n0 100, n 200, alpha 0.001" in out
    assert "runs           1\n" in out and "rows 1-30 (idx 0-435)" in out
    cohen = tmp_path / "cohen.tsv"
    cohen.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t1\t1\t0.5\t1\t0:00:01\n")
    assert main(["info", str(cohen)]) == 0
    assert "configuration  unknown: no metadata file" in capsys.readouterr().out
