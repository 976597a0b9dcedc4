"""drt-fast train: trainers, checkpoints, resume, DRT's effect, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import cli_fixtures as fx
from drt_fast import cli, embedded
from drt_fast.checkpoint import load_checkpoint
from drt_fast.train import TrainConfig, train
from drt_fast.train import steps as steps_mod
from drt_fast.train import trainer as trainer_mod
from drt_fast.errors import DrtFastError
from drt_fast.train.diagnose import diagnose

SIGMA = 0.25


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def state_dicts(path):
    ens, _ = load_checkpoint(path)
    return [m.state_dict() for m in ens.members]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory, one_thread):
    """A Gaussian-augmented 3-member digits ensemble (12 quick epochs)."""
    path = tmp_path_factory.mktemp("base") / "gaussian.pt"
    assert run_cli("train", "--sigma", SIGMA, "--epochs", 12, "--lr", 0.05, "--batch", 64,
                   "--out", path, "--quiet", "--seed", 0) == 0
    return path


def test_checkpoint_records_the_run(base, tmp_path):
    ens, meta = load_checkpoint(base)
    assert len(ens.members) == 3 and meta["arch"] == "digits_cnn" and meta["dataset"] == "digits"
    assert meta["sigma"] == SIGMA
    cfg = meta["train_config"]
    assert cfg["trainer"] == "gaussian" and cfg["epochs_done"] == 12
    assert cfg["command"].startswith("drt-fast train --sigma 0.25")
    # members start from different random weights
    sds = [m.state_dict() for m in ens.members]
    assert not torch.equal(sds[0]["1.fc.weight"], sds[1]["1.fc.weight"])


def test_drt_lowers_gradient_cosine_and_raises_margin(base, tmp_path):
    """Same start, same epochs: DRT vs the Gaussian-only continuation."""
    common = ["--sigma", SIGMA, "--epochs", 4, "--lr", 0.01, "--m", 2, "--init", base,
              "--quiet", "--seed", 1]
    gauss, drt = tmp_path / "gauss.pt", tmp_path / "drt.pt"
    assert run_cli("train", *common, "--trainer", "gaussian", "--out", gauss) == 0
    assert run_cli("train", *common, "--trainer", "drt", "--rho1", 5.0, "--rho2", 1.0,
                   "--out", drt) == 0
    from drt_fast import data

    test = data.load("digits", "test")
    d = {}
    for name, path in (("gauss", gauss), ("drt", drt)):
        ens, _ = load_checkpoint(path)
        d[name] = diagnose(list(ens.members), test.x, test.y, SIGMA, noise_draws=2, seed=0)
    # measured: cosine 0.67 -> 0.50, margin 0.780 -> 0.794
    assert d["drt"].mean_cosine < d["gauss"].mean_cosine - 0.1
    assert d["drt"].mean_margin > d["gauss"].mean_margin


def test_resume_gives_the_uninterrupted_weights(base, tmp_path, monkeypatch):
    common = dict(sigma=SIGMA, trainer="drt", rho1=0.5, rho2=1.0, m=2, epochs=2, lr=0.02,
                  batch=128, init=str(base), quiet=True, seed=3)
    whole = tmp_path / "whole.pt"
    train(TrainConfig(out=str(whole), **common))

    # interrupt the second run right after its first epoch's checkpoint
    cut = tmp_path / "cut.pt"
    calls = []

    def interrupt(entry):
        calls.append(entry["epoch"])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(cut), **common), on_epoch=interrupt)
    assert calls == [1]
    assert load_checkpoint(cut)[1]["train_config"]["epochs_done"] == 1
    train(TrainConfig(out=str(cut), resume=True, **common))
    for a, b in zip(state_dicts(whole), state_dicts(cut)):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # and the two runs did move the weights
    assert not torch.equal(state_dicts(base)[0]["1.fc.weight"], state_dicts(whole)[0]["1.fc.weight"])


@pytest.mark.parametrize("trainer", ["smoothadv", "drt-smoothadv"])
def test_smoothadv_trainers_run_and_log(trainer, base, tmp_path):
    out, log = tmp_path / "s.pt", tmp_path / "s.jsonl"
    drt = ["--rho1", 0.5, "--rho2", 1.0] if trainer == "drt-smoothadv" else []
    assert run_cli("train", "--sigma", SIGMA, "--trainer", trainer, "--epochs", 1, "--m", 2,
                   "--steps", 2, "--eps", 0.25, "--eps-warmup", 4, *drt,
                   "--lr", 0.01, "--init", base, "--out", out, "--log", log, "--quiet") == 0
    (entry,) = [json.loads(l) for l in log.read_text().splitlines()]
    assert set(entry) == {"epoch", "ce", "gd", "cm", "train_acc", "test_acc", "lr", "time", "eps"}
    assert entry["eps"] == pytest.approx(0.25 / 4)      # first epoch of a 4-epoch warm-up
    assert entry["test_acc"] > 0.6                      # fine-tuning kept a working ensemble
    if trainer == "drt-smoothadv":
        assert entry["gd"] > 0 and entry["cm"] > 0
    else:                                               # terms SmoothAdv does not compute
        assert entry["gd"] is None and entry["cm"] is None


def test_pgd_increases_the_smoothed_loss(base):
    from drt_fast.train.smoothadv import pgd_smoothed, smoothed_soft_log_prob
    from drt_fast import data

    ens, _ = load_checkpoint(base)
    f = ens.members[0].eval()
    test = data.load("digits", "test")
    x, y, m = test.x[:64], test.y[:64], 4
    noise = SIGMA * torch.randn((64 * m, *x.shape[1:]), generator=torch.Generator().manual_seed(0))
    x_adv = pgd_smoothed([f], x, y, noise, m, eps=0.5, steps=4)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before = smoothed_soft_log_prob([f], x.repeat_interleave(m, 0), noise, y, m).mean()
        after = smoothed_soft_log_prob([f], x_adv.repeat_interleave(m, 0), noise, y, m).mean()
    assert after < before - 0.05


def test_round_trip_train_checkpoint_certify(base, tmp_path):
    """The trained checkpoint certifies through the API and the CLI."""
    pytest.importorskip("drt_fast._C")
    from drt_fast import SmoothedClassifier, data

    ens, meta = load_checkpoint(base)
    test = data.load("digits", "test")
    smooth = SmoothedClassifier(ens, num_classes=10, sigma=meta["sigma"], seed=0)
    certs = smooth.certify_many(test.x[:20], list(range(20)), n0=50, n=500, alpha=0.001,
                                batch_size=500)
    correct = sum(c.label == int(t) for c, t in zip(certs, test.y[:20]))
    assert correct >= 14
    out = tmp_path / "r.tsv"
    assert run_cli("certify", "--model", base, "--n", 200, "--n0", 20, "--max", 5,
                   "--out", out, "--quiet") == 0
    assert out.read_text().startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime")


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vgg_nope"], "unknown architecture"),
    (["--sigma", "0"], "--sigma"),
    (["--sigma", "-0.5"], "--sigma"),
    (["--rho1", "-1"], "--rho1"),
    (["--rho2", "-0.1"], "--rho2"),
    (["--members", "0"], "--members"),
    (["--trainer", "drt", "--members", "1"], "--members"),
    (["--m", "0"], "--m"),
    (["--eps-warmup", "-1"], "--eps-warmup"),
    (["--dataset", "npz", "--data-dir", "/nonexistent/d.npz"], "d.npz"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent"], "/nonexistent"),
    (["--arch", "lenet"], "expects inputs of shape"),
    (["--seed", str(2**64)], "--seed"),
    (["--rho1", "1"], "--rho1 applies to the drt and drt-smoothadv trainers"),
    (["--gd-norm", "sq"], "--gd-norm applies"),
    (["--trainer", "drt", "--eps", "0.5"], "--eps applies to the smoothadv and drt-smoothadv"),
    (["--log", "/proc/drt-fast-test.log"], "cannot write the log"),
    (["--init", "/nonexistent/a.pt", "/nonexistent/b.pt"], "/nonexistent/a.pt does not exist"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "keep.pt"
    out.write_bytes(b"precious")
    # --overwrite: the file may be replaced, but not before the input has been checked
    code = run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--out", out, "--quiet", "--overwrite", *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("drt-fast: error:") and "\n" not in err
    assert message in err
    assert out.read_bytes() == b"precious"
    assert not os.path.exists(trainer_mod.state_path(str(out)))


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    """A second run into the same --out must not replace a trained model by accident."""
    out = tmp_path / "model.pt"
    out.write_bytes(b"trained for days")
    argv = ["train", "--sigma", SIGMA, "--epochs", 1, "--members", 2, "--out", out, "--quiet"]
    assert run_cli(*argv) == 2
    assert "model.pt exists: pass --resume to continue its run, --overwrite to replace it" in \
        capsys.readouterr().err
    assert run_cli(*argv, "--resume", "--overwrite") == 2
    assert "pass one of them" in capsys.readouterr().err
    assert out.read_bytes() == b"trained for days"
    assert run_cli(*argv, "--overwrite") == 0
    assert load_checkpoint(out)[1]["num_classes"] == 10
    os.remove(out)          # the training state left beside it also counts as a run to keep
    assert run_cli(*argv) == 2
    assert "model.pt.state.pt exists" in capsys.readouterr().err


def test_unwritable_output(tmp_path, capsys):
    code = run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--quiet",
                   "--out", tmp_path / "missing_dir" / "x.pt")
    assert code == 2 and "does not exist" in capsys.readouterr().err
    # a folder that permission bits call writable but that takes no files: refused before
    # training, not after the first epoch
    code = run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--quiet", "--out", "/proc/drt-fast-test.pt",
                   "--log", tmp_path / "log.jsonl")
    assert code == 2 and "cannot write the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "log.jsonl").exists()


def test_log_files(tmp_path, capsys):
    """--log: CSV by its name, JSON lines otherwise; an existing log is refused like an
    existing --out, replaced by --overwrite, continued by --resume; never the checkpoint."""
    import csv

    out, log = tmp_path / "l.pt", tmp_path / "l.csv"
    argv = ["train", "--sigma", SIGMA, "--members", 2, "--out", out, "--log", log, "--quiet"]
    assert run_cli(*argv, "--epochs", 1) == 0
    rows = list(csv.DictReader(log.open()))
    assert [r["epoch"] for r in rows] == ["1"]
    assert list(rows[0]) == ["epoch", "ce", "gd", "cm", "train_acc", "test_acc", "lr", "time"]
    assert rows[0]["gd"] == rows[0]["cm"] == "" and float(rows[0]["ce"]) > 0   # not computed
    os.remove(out)
    os.remove(trainer_mod.state_path(str(out)))
    assert run_cli(*argv, "--epochs", 1) == 2                    # the log alone is a run to keep
    assert "l.csv exists" in capsys.readouterr().err
    assert run_cli(*argv, "--epochs", 1, "--overwrite") == 0
    assert [r["epoch"] for r in csv.DictReader(log.open())] == ["1"]   # replaced, not appended
    kept = log.read_text()
    assert run_cli(*argv, "--epochs", 1, "--overwrite", "--lr", 1e4) == 2    # diverges in epoch 1
    assert "training diverged" in capsys.readouterr().err
    assert log.read_text() == kept       # the old run's log stays until the new run has an epoch
    code = run_cli("train", "--sigma", SIGMA, "--out", out, "--log", out, "--overwrite", "--quiet")
    assert code == 2 and "would overwrite the checkpoint" in capsys.readouterr().err
    assert load_checkpoint(out)[1]["members"] == 2


def test_a_diverging_run_stops_and_writes_nothing(tmp_path, capsys):
    out, log = tmp_path / "nan.pt", tmp_path / "nan.jsonl"
    code = run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--lr", 1e4, "--members", 2,
                   "--out", out, "--log", log, "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "training diverged" in err and "\n" not in err, err
    assert not out.exists() and not log.exists()


def test_paths_given_to_the_api_leave_files_that_load(tmp_path):
    """TrainConfig(init=Path(...)) (init_paths takes any os.PathLike): the checkpoint and the
    training state hold it as a str, so that their weights-only loads can read them back."""
    from pathlib import Path

    from drt_fast.checkpoint import safe_load

    default = Path(embedded.ASSETS) / "default.pt"
    out = tmp_path / "api.pt"
    train(TrainConfig(init=default, data_dir=tmp_path, epochs=1, lr=0.01, out=str(out), quiet=True))
    _, meta = load_checkpoint(out)
    # paths are kept relative to the checkpoint's folder (nothing of this machine travels)
    assert meta["train_config"]["init"] == os.path.relpath(default, tmp_path)
    assert meta["train_config"]["data_dir"] == "." and meta["train_config"]["out"] == "api.pt"
    state = safe_load(trainer_mod.state_path(str(out)), "cpu", "training state")
    assert state["config"]["init"] == os.path.relpath(default, tmp_path)


def test_init_from_member_files_and_mismatched_classes(base, tmp_path, capsys):
    """--init takes one file per member (Cohen/DRT base models): the same start as the
    drt-fast ensemble they came from gives the same weights; a checkpoint with other classes
    than the data is one line."""
    import numpy as np
    from drt_fast import data

    ens, _ = load_checkpoint(base)
    files = []
    for i, member in enumerate(ens.members):
        files.append(tmp_path / f"cohen{i}.pt")
        torch.save({"arch": "digits_cnn", "state_dict": member.state_dict()}, files[-1])
    drt = ["train", "--sigma", SIGMA, "--trainer", "drt", "--rho1", 0.5, "--epochs", 1, "--seed", 4,
           "--quiet"]
    assert run_cli(*drt, "--init", *files, "--out", tmp_path / "a.pt") == 0
    assert run_cli(*drt, "--init", base, "--out", tmp_path / "b.pt") == 0
    for a, b in zip(state_dicts(tmp_path / "a.pt"), state_dicts(tmp_path / "b.pt")):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # 20 classes in the file, 3 in the data
    digits = data.load("digits", "train")
    npz = fx.write_npz(tmp_path / "three.npz", digits.x[:200].numpy(), (digits.y[:200] % 3).numpy())
    wide = fx.save(tmp_path / "wide.pt", fx.members("digits_cnn", 20, *data.normalization("digits"), count=3),
                   "digits_cnn", "npz", 20, (1, 8, 8), data.normalization("digits"))
    code = run_cli("train", "--sigma", SIGMA, "--dataset", "npz", "--data-dir", npz, "--epochs", 1,
                   "--init", wide, "--out", tmp_path / "c.pt", "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 20 classes, dataset npz has 3" in err and "\n" not in err, err
    assert np.load(npz)["y"].max() == 2
    # per-member files on an .npz: their normalization must be the file's
    plain = fx.write_npz(tmp_path / "plain.npz", digits.x[:200].numpy(), digits.y[:200].numpy())
    code = run_cli(*drt, "--dataset", "npz", "--data-dir", plain, "--init", *files, "--out", tmp_path / "e.pt")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "normalizes inputs with means" in err and "\n" not in err, err
    means, sds = data.normalization("digits")
    same = fx.write_npz(tmp_path / "same.npz", digits.x[:200].numpy(), digits.y[:200].numpy(),
                        means=np.array(means), sds=np.array(sds))
    assert run_cli(*drt, "--dataset", "npz", "--data-dir", same, "--init", *files,
                   "--out", tmp_path / "f.pt") == 0
    # a drt-fast ensemble of another dataset, when its normalization is the npz's
    assert run_cli(*drt, "--dataset", "npz", "--data-dir", same, "--init", base,
                   "--out", tmp_path / "g.pt") == 0
    # an .npz has no held-out split: its log reports no test accuracy rather than the training set's
    log = tmp_path / "npz.jsonl"
    assert run_cli("train", "--sigma", SIGMA, "--dataset", "npz", "--data-dir", npz, "--epochs", 1,
                   "--members", 2, "--out", tmp_path / "d.pt", "--log", log, "--quiet") == 0
    (entry,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["test_acc"] is None and 0 <= entry["train_acc"] <= 1


def test_resume_refuses_a_foreign_checkpoint(base, tmp_path, capsys):
    out = tmp_path / "run.pt"
    assert run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--out", out, "--quiet") == 0
    before = out.read_bytes(), open(trainer_mod.state_path(str(out)), "rb").read()
    # different trainer / members / sigma: all refused, nothing touched
    for change in (["--trainer", "drt"], ["--members", "2"], ["--sigma", "0.5"]):
        sigma = [] if change[0] == "--sigma" else ["--sigma", SIGMA]
        code = run_cli("train", *sigma, "--epochs", 1, "--out", out, "--quiet", "--resume", *change)
        err = capsys.readouterr().err
        assert code == 2 and "different run" in err, err
    assert (out.read_bytes(), open(trainer_mod.state_path(str(out)), "rb").read()) == before
    # resume with no state at all
    code = run_cli("train", "--sigma", SIGMA, "--out", tmp_path / "none.pt", "--quiet", "--resume")
    assert code == 2 and "no training state" in capsys.readouterr().err


def test_init_must_match(base, tmp_path, capsys):
    code = run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--members", 2, "--init", base,
                   "--out", tmp_path / "x.pt", "--quiet")
    assert code == 2 and "3 members" in capsys.readouterr().err


def test_lr_schedules():
    step = TrainConfig(epochs=8, lr=0.1, lr_schedule="step")
    assert [round(trainer_mod.lr_at(step, e), 6) for e in range(8)] == \
        [0.1] * 4 + [0.01] * 2 + [0.001] * 2
    cos = TrainConfig(epochs=4, lr=0.1, lr_schedule="cosine")
    assert trainer_mod.lr_at(cos, 0) == pytest.approx(0.1)
    assert trainer_mod.lr_at(cos, 2) == pytest.approx(0.05)
    cohen = TrainConfig(epochs=90, lr=0.1, lr_step=30)            # Cohen et al.'s schedule
    assert [trainer_mod.lr_at(cohen, e) for e in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    half = TrainConfig(epochs=4, lr=0.1, lr_step=1, lr_gamma=0.5)
    assert [trainer_mod.lr_at(half, e) for e in range(4)] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    milestones = TrainConfig(epochs=4, lr=0.1, lr_gamma=0.5)      # --lr-gamma without --lr-step
    assert [trainer_mod.lr_at(milestones, e) for e in range(4)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    for bad, message in ((dict(lr_step=0), "--lr-step must be >= 1"),
                         (dict(lr_gamma=0.0), "--lr-gamma must be in"),
                         (dict(lr_gamma=1.5), "--lr-gamma must be in"),
                         (dict(lr_schedule="cosine", lr_step=10), "shape the step schedule")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad).validate()


def test_resume_of_a_state_written_before_a_setting_existed(tmp_path):
    """A training state from an older drt-fast lacks the newer settings: it ran as their
    defaults do, so a resume with the defaults goes on."""
    common = dict(sigma=SIGMA, epochs=2, batch=256, quiet=True)
    whole = tmp_path / "whole.pt"
    train(TrainConfig(out=str(whole), **common))
    cut = tmp_path / "cut.pt"
    train(TrainConfig(out=str(cut), **{**common, "epochs": 1}))
    state = torch.load(trainer_mod.state_path(str(cut)), weights_only=True)
    for key in ("lr_step", "lr_gamma", "augment", "eps_warmup", "world_size"):
        del state["config"][key]
    state["config"]["epochs"] = 2
    torch.save(state, trainer_mod.state_path(str(cut)))
    train(TrainConfig(out=str(cut), resume=True, **common))
    for a, b in zip(state_dicts(whole), state_dicts(cut)):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_smoothadv_eps_warmup_schedule():
    """Salman et al.'s warm-up: eps * (epoch + 1) / warmup, then eps; none by default."""
    warm = TrainConfig(trainer="smoothadv", eps=0.5, eps_warmup=4, epochs=8)
    assert [trainer_mod.eps_at(warm, e) for e in range(6)] == \
        pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert trainer_mod.eps_at(TrainConfig(eps=0.5), 0) == 0.5


def test_embedded_default_is_consistent():
    """assets/: default.json names a 3-member digits DRT ensemble and the digits test split."""
    import numpy as np
    from pathlib import Path

    import drt_fast
    from drt_fast import data

    assets = Path(drt_fast.__file__).parent / "assets"
    spec = json.loads((assets / "default.json").read_text())
    assert spec["sigma"] == 0.25 and spec["skip"] >= 1 and spec["max"] >= 1
    assert "--trainer drt" in spec["recipe"] and "--trainer gaussian" in spec["recipe"]
    ens, meta = load_checkpoint(assets / spec["model"])
    assert len(ens.members) == 3 and meta["arch"] == "digits_cnn" and meta["sigma"] == 0.25
    assert meta["train_config"]["trainer"] == "drt"
    assert (assets / spec["model"]).stat().st_size < 2 * 2**20
    npz = np.load(assets / spec["data"])
    test = data.load("digits", "test")
    assert np.array_equal(npz["x"], test.x.numpy()) and np.array_equal(npz["y"], test.y.numpy())
    assert np.array_equal(npz["idx"], np.arange(len(test.y)))
    assert (ens.predict(test.x) == test.y).float().mean() > 0.95


def test_torchrun_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: shares batches, averages gradients, rank 0 writes once."""
    out, log = tmp_path / "ddp.pt", tmp_path / "ddp.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "drt_fast", "--", "train", "--sigma", str(SIGMA), "--trainer", "drt",
         "--rho1", "0.5", "--rho2", "1", "--m", "2", "--epochs", "2", "--batch", "64",
         "--out", str(out), "--log", str(log), "--quiet"],
        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300, cwd=fx.NEUTRAL_CWD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries = [json.loads(l) for l in log.read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2]          # one writer
    assert entries[-1]["test_acc"] > 0.8 and entries[-1]["gd"] > 0
    ens, meta = load_checkpoint(out)
    assert len(ens.members) == 3 and meta["train_config"]["epochs_done"] == 2
    # the batch split depends on the process count: a single-process resume is another run
    before = out.read_bytes()
    code = run_cli("train", "--sigma", SIGMA, "--trainer", "drt", "--rho1", 0.5, "--rho2", 1,
                   "--m", 2, "--epochs", 2, "--batch", 64, "--out", out, "--quiet", "--resume")
    assert code == 2 and out.read_bytes() == before
    # a batch too small to give each process an input: one line from each rank, no traceback
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "drt_fast", "--", "train", "--sigma", str(SIGMA), "--epochs", "1", "--batch", "1",
         "--out", str(tmp_path / "b1.pt"), "--quiet"],
        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300, cwd=fx.NEUTRAL_CWD)
    assert proc.returncode != 0 and "cannot give each of the 2 processes an input" in proc.stderr
    assert "ZeroDivisionError" not in proc.stderr and not (tmp_path / "b1.pt").exists()


@pytest.mark.parametrize("trainer", ["drt", "drt-smoothadv"])
def test_cuda_amp_training_runs_and_resumes_on_cpu(trainer, base, cuda_device, tmp_path):
    """DRT (double backprop under bf16 autocast) on the GPU: finite losses, a working
    ensemble, a checkpoint that loads on the CPU and certifies there."""
    out, log = tmp_path / "g.pt", tmp_path / "g.jsonl"
    adv = ["--steps", 2, "--eps", 0.25] if trainer == "drt-smoothadv" else []
    assert run_cli("train", "--sigma", SIGMA, "--trainer", trainer, "--epochs", 2, "--m", 2,
                   *adv, "--rho1", 0.5, "--rho2", 1.0, "--lr", 0.01,
                   "--init", base, "--device", "cuda", "--out", out, "--log", log,
                   "--quiet") == 0
    entries = [json.loads(l) for l in log.read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2]
    for e in entries:
        assert all(torch.isfinite(torch.tensor(float(e[k]))) for k in ("ce", "gd", "cm"))
        assert e["gd"] > 0
    assert entries[-1]["test_acc"] > 0.8
    ens, meta = load_checkpoint(out)
    assert meta["train_config"]["amp"] is True
    assert all(p.device.type == "cpu" for p in ens.parameters())
    assert run_cli("certify", "--model", out, "--n", 100, "--n0", 20, "--max", 3,
                   "--device", "cpu", "--out", tmp_path / "c.tsv", "--quiet") == 0


def test_resume_from_a_file_that_is_not_a_training_state(tmp_path, capsys):
    out = tmp_path / "m.pt"
    state = trainer_mod.state_path(str(out))
    argv = ["train", "--sigma", SIGMA, "--epochs", 1, "--out", out, "--quiet", "--resume"]
    with open(state, "wb") as f:
        f.write(b"\x80\x02junk" * 100)
    assert run_cli(*argv) == 2
    assert capsys.readouterr().err.strip() == \
        f"drt-fast: error: cannot read training state {state}: corrupt, truncated or not a torch file"
    torch.save({"epoch": 1}, state)
    assert run_cli(*argv) == 2
    assert capsys.readouterr().err.strip() == \
        f"drt-fast: error: --resume: {state} is not a drt-fast training state"


def test_a_directory_as_out_or_log_is_named_so(tmp_path, capsys):
    for flag in ("--out", "--log"):
        argv = ["train", "--sigma", SIGMA, "--epochs", 1, "--quiet", "--out", tmp_path / "x.pt", flag, tmp_path]
        assert run_cli(*argv) == 2
        assert f"{flag} {tmp_path} is a directory" in capsys.readouterr().err


def test_a_last_step_that_breaks_the_weights_is_caught(tmp_path, capsys):
    """Divergence shows in the next step's loss; the epoch's last step is checked on the
    weights (one step here: 60 inputs, batch 64)."""
    import numpy as np
    from drt_fast import data

    digits = data.load("digits", "train")
    npz = fx.write_npz(tmp_path / "small.npz", digits.x[:60].numpy(), digits.y[:60].numpy(),
                       means=np.array(data.normalization("digits")[0]),
                       sds=np.array(data.normalization("digits")[1]), num_classes=np.array(10))
    code = run_cli("train", "--sigma", SIGMA, "--dataset", "npz", "--data-dir", npz, "--epochs", 1,
                   "--members", 2, "--lr", 1e38, "--out", tmp_path / "big.pt", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and "training diverged" in err and not (tmp_path / "big.pt").exists()


# ------------------------------------------------------------------ one step of each trainer

class _ModeLinear(torch.nn.Module):
    """f(x) = W (x - 1/2), with logits doubled in eval mode (as BatchNorm, eval and train
    differ)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float64))

    def forward(self, x):
        return ((x.flatten(1) - 0.5) @ self.weight.T) * (1.0 if self.training else 2.0)


def _step_case(trainer, **kw):
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 6))
    members = [_ModeLinear(3 * base + rng.normal(size=(4, 6))) for _ in range(3)]
    x = torch.tensor(rng.uniform(0.05, 0.95, size=(5, 6)))
    y = ((x - 0.5) @ torch.tensor(base).T).argmax(1)
    assert len(set(y.tolist())) > 2
    config = TrainConfig(trainer=trainer, members=3, m=2, sigma=0.1, **kw)
    return config, members, x, y


def _run_step(config, members, x, y):
    import contextlib

    gen = torch.Generator().manual_seed(11)
    step = steps_mod.Step(config, members)
    step.eps = config.eps / 2            # the epoch's radius (eps_at, during an eps warm-up)
    return step(x, y, gen, contextlib.nullcontext)


def _draws(config, shape):
    """The step's noise, in the order it draws it: sigma * N(0, I) of ``shape`` per call."""
    gen = torch.Generator().manual_seed(11)
    return lambda: config.sigma * torch.randn(shape, generator=gen, dtype=torch.float64)


def _pgd_in_eval_mode(models, x, y, noise, config):
    from drt_fast.train.smoothadv import pgd_smoothed

    for f in models:
        f.eval()
    x_adv = pgd_smoothed(models, x, y, noise, config.m, config.eps / 2, config.steps)
    for f in models:
        f.train()
    assert (x_adv - x).abs().max() > 1e-3           # the attack moved the inputs
    return x_adv


@pytest.mark.parametrize("trainer, rho1, rho2, gd_norm", [
    ("drt", 0.5, 0.0, "l2"), ("drt", 0.0, 0.7, "l2"), ("drt", 0.5, 0.7, "sq"),
    ("drt-smoothadv", 0.5, 0.7, "l2")])
def test_drt_step_loss_is_ce_plus_rho1_gd_minus_rho2_cm(trainer, rho1, rho2, gd_norm):
    """loss = sum_i CE(f_i(x + eps), y) + rho1 GD - rho2 CM on m noisy copies per input
    (rows b*m + j), the same copies for every member; drt-smoothadv: at the PGD point of the
    smoothed ensemble (eval mode, the epoch's radius), with the same noise. Terms with a zero weight are off
    (GD is not even computed when rho1 = 0, CM still is when rho2 > 0)."""
    import torch.nn.functional as F
    from drt_fast.train.losses import drt_terms

    adv = dict(eps=0.3, steps=2) if trainer == "drt-smoothadv" else {}
    config, members, x, y = _step_case(trainer, rho1=rho1, rho2=rho2, gd_norm=gd_norm, **adv)
    loss, stats = _run_step(config, members, x, y)

    eps = _draws(config, (10, 6))()
    y_rep = y.repeat_interleave(2)
    point = x if trainer == "drt" else _pgd_in_eval_mode(members, x, y, eps, config)
    x_noisy = point.repeat_interleave(2, dim=0) + eps
    ces = [F.cross_entropy(f(x_noisy), y_rep) for f in members]
    gd, cm = drt_terms(members, x_noisy, y_rep, gd_norm)
    assert 0 < gd.item() and 0 < cm.item()
    expected = sum(ces) + rho1 * gd - rho2 * cm
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["ce"] == pytest.approx(sum(c.item() for c in ces) / 3, rel=1e-6)
    assert stats["cm"] == pytest.approx(cm.item(), rel=1e-6)
    # the logged train_acc: the fraction of (member, noisy copy) predictions that are right
    assert stats["acc"] == pytest.approx(
        torch.stack([f(x_noisy).argmax(1) == y_rep for f in members]).double().mean().item())
    assert stats["gd"] == (None if rho1 == 0 else pytest.approx(gd.item(), rel=1e-6))


@pytest.mark.parametrize("trainer", ["gaussian", "smoothadv"])
def test_gaussian_and_smoothadv_steps_give_each_member_its_own_noise(trainer):
    """gaussian: sum_i CE(f_i(x + sigma eps_i), y), eps_i drawn per member; smoothadv: per
    member, PGD of that member's smoothed classifier (eval mode) with eps_i, then CE at
    the adversarial point plus the same eps_i."""
    import torch.nn.functional as F

    adv = dict(eps=0.3, steps=2) if trainer == "smoothadv" else {}
    config, members, x, y = _step_case(trainer, **adv)
    loss, stats = _run_step(config, members, x, y)

    draw = _draws(config, (10, 6))
    y_rep = y.repeat_interleave(2)
    ces, right = [], []
    for f in members:
        eps_i = draw()
        point = x if trainer == "gaussian" else _pgd_in_eval_mode([f], x, y, eps_i, config)
        logits = f(point.repeat_interleave(2, dim=0) + eps_i)
        ces.append(F.cross_entropy(logits, y_rep))
        right.append(logits.argmax(1) == y_rep)
    assert stats["acc"] == pytest.approx(torch.stack(right).double().mean().item())
    assert loss.item() == pytest.approx(sum(ces).item(), rel=1e-6)
    assert stats["ce"] == pytest.approx(sum(ces).item() / 3, rel=1e-6)
    assert stats["gd"] is None and stats["cm"] is None


def _reference_pgd(models, x, y, noise, m, eps, steps):
    """Salman et al.'s PGD_L2 on the smoothed soft classifier, written out per input:
    G(x)_y = mean over models and the m draws of softmax(f(x + noise_j))_y (noise rows
    b*m .. b*m+m-1 belong to input b); `steps` ascent steps of -log G_y of size 2 eps/steps
    along the unit-L2 gradient, each followed by the pixel box and the L2 ball."""
    out = []
    for b in range(len(x)):
        x0, delta = x[b:b + 1], torch.zeros_like(x[b:b + 1])
        draws = noise[b * m:(b + 1) * m]
        for _ in range(steps):
            d = delta.clone().requires_grad_(True)
            probs = [torch.softmax(f(x0 + d + draws[j:j + 1]), dim=1)[0, y[b]]
                     for f in models for j in range(m)]
            loss = -torch.log(sum(probs) / len(probs))
            (grad,) = torch.autograd.grad(loss, [d])
            with torch.no_grad():
                delta = delta + (2 * eps / steps) * grad / grad.norm()
                delta = (x0 + delta).clamp(0, 1) - x0
                if delta.norm() > eps:
                    delta = delta * (eps / delta.norm())
        out.append(x0 + delta)
    return torch.cat(out)


@pytest.mark.parametrize("n_models", [1, 2])
def test_pgd_matches_a_per_input_reference(n_models):
    """The step direction (unit L2), size (2 eps / steps), projections, and the attacked
    function (log of the mean softmax over draws and models, not the mean log-softmax)."""
    import numpy as np
    from drt_fast.train.smoothadv import pgd_smoothed, smoothed_soft_log_prob

    rng = np.random.default_rng(3)
    models = [_ModeLinear(2 * rng.normal(size=(4, 6))).eval() for _ in range(n_models)]
    x = torch.tensor(rng.uniform(0.05, 0.95, size=(5, 6)))
    y = torch.tensor([0, 1, 2, 3, 1])
    m, eps, steps = 3, 0.4, 4
    noise = 0.5 * torch.randn((5 * m, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = pgd_smoothed(models, x, y, noise, m, eps, steps)
    want = _reference_pgd(models, x, y, noise, m, eps, steps)
    # (torch.renorm divides by norm + 1e-7: inside the ball by ~1e-7)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    norms = (got - x).norm(dim=1)
    assert norms.max() <= eps + 1e-12 and norms.min() > 0.1     # it moved every input
    # the attacked function: log of the average probability, per input
    x_rep = x.repeat_interleave(m, dim=0)
    with torch.no_grad():
        avg = torch.stack([torch.softmax(f(x_rep + noise), 1) for f in models]).mean(0)
        want_log = avg.view(5, m, 4).mean(1)[torch.arange(5), y].log()
        torch.testing.assert_close(smoothed_soft_log_prob(models, x_rep, noise, y, m), want_log,
                                   rtol=1e-12, atol=0)


def test_resume_continues_the_log_and_each_epoch_is_shuffled_anew(tmp_path, monkeypatch):
    """The resumed run appends its epochs to the log (each with that epoch's learning rate),
    and every epoch visits the training set in its own order, with its own noise."""
    out, log = tmp_path / "r.pt", tmp_path / "r.jsonl"
    common = dict(sigma=SIGMA, members=1, epochs=2, batch=256, log=str(log), quiet=True)
    orders, first_noise = [], []
    real_loss = steps_mod.gaussian_loss

    def recording_loss(model, x, y, sigma, generator=None):
        if len(first_noise) < len(orders):          # the epoch's first step: its next draw
            state = generator.get_state()
            first_noise.append(torch.randn(4, generator=generator))
            generator.set_state(state)
        return real_loss(model, x, y, sigma, generator)

    monkeypatch.setattr(steps_mod, "gaussian_loss", recording_loss)

    class Recording(trainer_mod.TrainInputs):
        def epoch(self, epoch, index_lists):
            orders.append(torch.cat(list(index_lists)))
            return super().epoch(epoch, index_lists)

    monkeypatch.setattr(trainer_mod, "TrainInputs", Recording)
    def interrupt(entry):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(out=str(out), **common), on_epoch=interrupt)
    train(TrainConfig(out=str(out), resume=True, **common))
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in entries] == [1, 2]
    config = TrainConfig(**common)
    assert [e["lr"] for e in entries] == [trainer_mod.lr_at(config, 0), trainer_mod.lr_at(config, 1)]
    assert entries[0]["lr"] != entries[1]["lr"]
    assert len(orders) == 2
    n = len(orders[0])
    assert all(torch.equal(o.sort().values, torch.arange(n)) for o in orders)
    assert not torch.equal(orders[0], orders[1])
    assert len(first_noise) == 2 and not torch.equal(first_noise[0], first_noise[1])


def test_resume_refuses_any_setting_that_changes_the_weights(tmp_path, capsys):
    out = tmp_path / "d.pt"
    common = dict(sigma=SIGMA, trainer="drt", rho1=0.5, rho2=0.5, members=2, epochs=2, batch=256,
                  quiet=True, out=str(out))
    train(TrainConfig(**{**common, "epochs": 1}))
    state = open(trainer_mod.state_path(str(out)), "rb").read()
    changes = dict(rho1=0.25, rho2=0.25, gd_norm="sq", m=2, lr=0.05, lr_step=1, lr_gamma=0.5,
                   seed=1, batch=128, weight_decay=0.0, sigma=0.5, epochs=1 + 2)
    for key, value in changes.items():
        with pytest.raises(DrtFastError, match=f"different run .*{key}: checkpoint"):
            train(TrainConfig(**{**common, "epochs": 1, key: value}, resume=True))
    assert open(trainer_mod.state_path(str(out)), "rb").read() == state
    # while the plumbing may change
    train(TrainConfig(**{**common, "epochs": 1, "quiet": False, "amp": False}, resume=True))


def test_a_step_with_a_non_finite_loss_is_never_taken(tmp_path, monkeypatch):
    """The check before the optimizer step: the error names the step, nothing is written."""
    real = steps_mod.Step.__call__
    calls = []

    def nan_at_step_2(self, *args):
        loss, stats = real(self, *args)
        calls.append(1)
        if len(calls) == 2:
            return loss * float("nan"), {**stats, "ce": float("nan")}
        return loss, stats

    monkeypatch.setattr(steps_mod.Step, "__call__", nan_at_step_2)
    out = tmp_path / "n.pt"
    with pytest.raises(DrtFastError, match=r"not finite in epoch 1, step 2 \("):
        train(TrainConfig(sigma=SIGMA, members=1, epochs=1, out=str(out), quiet=True))
    assert len(calls) == 2 and not out.exists()


def test_clean_accuracy_is_that_of_the_averaged_probabilities():
    """The logged test accuracy is the WE ensemble's: argmax of the mean member softmax
    (here not the argmax of the mean logits)."""
    from torch import nn

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(6, 4)).double() for _ in range(3)]
    with torch.no_grad():
        members[0][1].weight.mul_(20)                   # one confident member
    x = torch.randn(200, 6, dtype=torch.float64)
    with torch.no_grad():
        z = torch.stack([f(x) for f in members])
    y = z.softmax(2).mean(0).argmax(1)
    assert not torch.equal(y, z.mean(0).argmax(1))     # the two rules disagree somewhere
    assert trainer_mod.clean_accuracy(members, x, y, batch=64) == 1.0


_NOISE_RECORDER = """
import os, sys
import torch
from drt_fast import cli
from drt_fast.train import steps

real = steps.gaussian_loss


def recording(model, x, y, sigma, generator=None):   # the next noise this rank would draw
    state = generator.get_state()
    with open({path!r} + os.environ["RANK"], "a") as fh:
        fh.write(repr(torch.randn(4, generator=generator).tolist()) + "\\n")
    generator.set_state(state)
    return real(model, x, y, sigma, generator)


steps.gaussian_loss = recording
sys.exit(cli.main(sys.argv[1:]))
"""


def test_torchrun_with_unequal_shares_takes_the_single_process_steps(tmp_path):
    """Batches of 3 on 2 processes: shares of 1 and 2 inputs. Each rank's loss weighted by
    its share and the gradients averaged give the whole batch's mean gradient, so with
    (next to) no noise the weights are the single-process run's. And each rank draws its
    own noise."""
    from drt_fast import data

    digits = data.load("digits", "train")
    npz = fx.write_npz(tmp_path / "nine.npz", digits.x[:9].numpy(), digits.y[:9].numpy(),
                       means=torch.tensor(data.normalization("digits")[0]).numpy(),
                       sds=torch.tensor(data.normalization("digits")[1]).numpy(), num_classes=10)
    args = ["train", "--dataset", "npz", "--data-dir", npz, "--members", "1", "--sigma", "1e-9",
            "--epochs", "1", "--batch", "3", "--lr", "0.5", "--weight-decay", "0", "--quiet"]
    noise = str(tmp_path / "noise-rank")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(_NOISE_RECORDER.format(path=noise))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(wrapper), "--", *args, "--out", str(tmp_path / "two.pt")],
        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300, cwd=fx.NEUTRAL_CWD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    draws = [open(noise + str(r)).read().splitlines() for r in (0, 1)]
    assert len(draws[0]) == len(draws[1]) == 3                  # 3 steps, 1 member
    assert all(a != b for a, b in zip(*draws))
    assert run_cli(*args, "--out", tmp_path / "one.pt") == 0
    torch.manual_seed(0)                    # the initial weights (build_members: seed 0)
    from drt_fast import models
    start = models.with_normalization(models.create("digits_cnn", 10), *data.normalization("digits")).state_dict()
    (two,), (one,) = state_dicts(tmp_path / "two.pt"), state_dicts(tmp_path / "one.pt")
    moved = max(float((one[k] - start[k]).abs().max()) for k in one)
    assert moved > 1e-2                                    # 3 steps did move the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4 * moved)



# ----------------------------------------------------------------------------- issue 21

def test_init_fixes_what_the_command_line_leaves_open(tmp_path, capsys):
    """item 5: --init lenet.pt without --arch failed: "has arch lenet, this run has 'digits_cnn'"."""
    import numpy as np

    lenet = fx.save(tmp_path / "lenet.pt", fx.members("lenet", 10, (0.0,), (1.0,), 2), "lenet", "mnist", 10,
                    (1, 28, 28), ((0.0,), (1.0,)))
    rng = np.random.default_rng(0)
    mnist = tmp_path / "mnist"
    for split in ("train", "test"):
        fx.write_mnist(mnist, rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), np.arange(16, dtype=np.uint8) % 10,
                       split=split)
    out = tmp_path / "t.pt"
    assert run_cli("train", "--init", lenet, "--data-dir", mnist, "--sigma", SIGMA, "--epochs", 1,
                   "--batch", 8, "--out", out, "--quiet") == 0
    meta = load_checkpoint(out)[1]
    assert (meta["arch"], meta["dataset"], meta["members"]) == ("lenet", "mnist", 2)
    # only a real conflict is refused
    assert run_cli("train", "--init", lenet, "--arch", "digits_cnn", "--data-dir", mnist, "--sigma", SIGMA,
                   "--epochs", 1, "--out", tmp_path / "x.pt", "--quiet") == 2
    assert "has arch lenet, this run has 'digits_cnn'" in capsys.readouterr().err
    assert run_cli("train", "--init", lenet, "--members", 3, "--data-dir", mnist, "--sigma", SIGMA,
                   "--epochs", 1, "--out", tmp_path / "y.pt", "--quiet") == 2
    assert "has 2 members, this run has --members 3" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_there_is_nothing_to_train(base, capsys):
    """item 7: it printed "wrote ..." without writing."""
    before = os.path.getmtime(base)
    assert run_cli("train", "--sigma", SIGMA, "--epochs", 12, "--lr", 0.05, "--batch", 64, "--out", base,
                   "--seed", 0, "--resume") == 0
    assert capsys.readouterr().out == f"nothing to train: {base} holds all 12 epochs of its run\n"
    assert os.path.getmtime(base) == before


@pytest.mark.parametrize("after_epoch", [1, None])
def test_ctrl_c_in_train_says_how_to_continue(after_epoch, tmp_path, monkeypatch, capsys):
    """item 7: as certify does, an interrupted train says what it kept and how to go on."""
    real_train = trainer_mod.train

    def interrupted(config, on_epoch):
        if after_epoch is None:
            raise KeyboardInterrupt

        def then_stop(entry):
            on_epoch(entry)
            raise KeyboardInterrupt
        return real_train(config, on_epoch=then_stop)

    monkeypatch.setattr(trainer_mod, "train", interrupted)
    out = tmp_path / "c.pt"
    assert run_cli("train", "--sigma", SIGMA, "--epochs", 2, "--members", 2, "--out", out, "--quiet") == 130
    said = {1: f"{out} holds epoch 1 of 2; continue with --resume", None: f"no epoch finished; {out} was not written"}
    assert capsys.readouterr().err == f"drt-fast: interrupted: {said[after_epoch]}\n"


def test_npz_training_says_once_that_it_has_no_test_split(tmp_path, capsys):
    """item 6: an npz run trained without a test split, silently."""
    from drt_fast import data

    train_split = data.load("digits", "train")
    npz = fx.write_npz(tmp_path / "d.npz", train_split.x[:64].numpy(), train_split.y[:64].numpy(), num_classes=10,
                       means=[0.3052], sds=[0.376])
    log = tmp_path / "l.jsonl"
    assert run_cli("train", "--dataset", "npz", "--data-dir", npz, "--sigma", SIGMA, "--epochs", 2, "--members", 2,
                   "--out", tmp_path / "n.pt", "--log", log, "--quiet") == 0
    err = capsys.readouterr().err.splitlines()
    assert err == ["drt-fast: warning: training without a test split (an .npz file is one set of inputs): "
                   "the log has no test accuracy"]
    assert [json.loads(line)["test_acc"] for line in log.read_text().splitlines()] == [None, None]


def test_the_record_keeps_paths_relative_to_the_checkpoint(base, tmp_path):
    """item 12: the embedded default carried the build machine's temporary paths."""
    folder = tmp_path / "runs" / "a"
    folder.mkdir(parents=True)
    out, log = folder / "drt.pt", folder / "drt.jsonl"
    assert run_cli("train", "--sigma", SIGMA, "--epochs", 1, "--init", os.path.abspath(base),
                   "--out", os.path.abspath(out), f"--log={os.path.abspath(log)}", "--quiet") == 0
    record = load_checkpoint(out)[1]["train_config"]
    init = os.path.relpath(base, folder)
    assert (record["init"], record["out"], record["log"]) == (init, "drt.pt", "drt.jsonl")
    assert record["command"] == f"drt-fast train --sigma 0.25 --epochs 1 --init {init} --out drt.pt --log=drt.jsonl --quiet"
    assert str(tmp_path) not in json.dumps(record)
