"""Preparing a certify/predict run (drt_fast.cli.prepare): numbers checked before any work,
checkpoints (drt-fast, Cohen, DRT member files, the embedded default), data, normalization,
devices and the engine's levers."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from drt_fast import data, embedded, io
from drt_fast.cli import main

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli_fixtures as fx  # noqa: E402
from cli_fixtures import RUN, ckpt, one_thread, reference_tsv  # noqa: E402,F401 (fixtures; one_thread autouse)


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


def test_data_without_model_says_the_default_is_a_digits_model(tmp_path, capsys):
    """item 2: --data-dir without --model fell back to the digits model with puzzling errors."""
    mnist = fx.write_mnist(tmp_path / "mnist", np.zeros((2, 28, 28), np.uint8), np.array([1, 2], np.uint8))
    odd = fx.write_npz(tmp_path / "odd.npz", np.zeros((2, 1, 28, 28), np.float32), np.array([0, 1]))
    for argv in (["--data-dir", mnist], ["--dataset", "mnist", "--data-dir", mnist], ["--dataset", "cifar10"],
                 ["--dataset", "npz", "--data-dir", odd], ["--data-dir", odd]):
        assert main(["certify", *argv, *RUN]) == 2
        assert fx.error_line(capsys).startswith(
            "drt-fast: error: no --model given: the embedded default is a digits model"), argv


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


def test_fp16_on_the_cpu_warns_and_points_to_bf16(ckpt, capsys):
    """item 3: fp16 on the CPU is many times slower than fp32, with only a fusion note."""
    assert main(["certify", "--model", ckpt, "--device", "cpu", "--precision", "fp16", *RUN, "--max", "1"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("drt-fast: warning: --precision fp16 on the CPU runs many times slower")
               and "--precision bf16" in line for line in err), err
    assert main(["certify", "--model", ckpt, "--device", "cpu", "--precision", "bf16", *RUN, "--max", "1"]) == 0
    assert "fp16" not in capsys.readouterr().err


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


def test_channels_last_flag_certifies_the_same_inputs(ckpt, reference_tsv, tmp_path):
    out = str(tmp_path / "cl.tsv")
    assert main(["certify", "--model", ckpt, *RUN, "--channels-last", "--out", out]) == 0
    rows, ref = fx.rows_without_time(out), fx.rows_without_time(reference_tsv)
    assert [r[:3] for r in rows] == [r[:3] for r in ref]      # idx, label, predict
    # Channels-last convolutions may round differently: counts agree to a draw or two.
    assert all(abs(int(a[-2]) - int(b[-2])) <= 2 for a, b in zip(rows[1:], ref[1:]))
