"""Small trained models and data files for the CLI tests (test_cli_*, test_distributed).

Built once per test session (cached in a temporary folder): a 2-member digits ensemble
trained with Gaussian augmentation for about a second, saved with
``checkpoint.save_ensemble``, and helpers that write data in MNIST idx / CIFAR pickle /
npz formats with matching tiny checkpoints.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import drt_fast

# Subprocesses must import the drt_fast this process imported (site-packages after
# `pip install .`, the source tree after `pip install -e .`), never the bare source folder,
# which has no compiled _C: put its parent first on PYTHONPATH and run them from a folder
# that holds no drt_fast (for `python -m`, the working directory comes first on sys.path).
PACKAGE_DIR = os.path.dirname(os.path.abspath(drt_fast.__file__))
NEUTRAL_CWD = tempfile.gettempdir()


def subprocess_env(**extra) -> dict:
    """The environment for a drt_fast subprocess: our drt_fast first, one OpenMP thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(PACKAGE_DIR),
                                                        os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env
SIGMA = 0.25

# Small certify runs: 30 of the 450 digits test inputs, n = 200.
RUN = ["--n", "200", "--skip", "15", "--quiet"]

_WORK = tempfile.mkdtemp(prefix="drt-fast-cli-tests-")
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block.

    The models here are tiny: a second thread gains nothing, and when other processes
    keep the cores busy, OpenMP's barrier waits make two threads many times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def one_thread():
    """Each test on one thread (import this fixture into a test module to apply it)."""
    with single_thread():
        yield


def members(arch: str, num_classes: int, means, sds, count: int, seed: int = 0) -> list:
    """``count`` fresh ``Sequential(NormalizeLayer, arch)`` members."""
    from drt_fast import models

    torch.manual_seed(seed)
    return [models.with_normalization(models.create(arch, num_classes), means, sds) for _ in range(count)]


def train_gaussian(member_list, x, y, sigma=SIGMA, steps=100, batch=64, seed=0) -> None:
    """A short Gaussian-augmentation training (Cohen): enough for most digits to certify.

    Runs on one thread (see `single_thread`).
    """
    with single_thread():
        _train(member_list, x, y, sigma, steps, batch, seed)


def _train(member_list, x, y, sigma, steps, batch, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    for member in member_list:
        opt = torch.optim.Adam(member.parameters(), lr=3e-3)
        member.train()
        for _ in range(steps):
            pick = torch.randint(0, len(x), (batch,), generator=gen)
            noisy = x[pick] + sigma * torch.randn(x[pick].shape, generator=gen)
            loss = torch.nn.functional.cross_entropy(member(noisy), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()
        member.eval()


def save(path, member_list, arch, dataset, num_classes, input_shape, normalization, sigma=SIGMA, mode="we"):
    from drt_fast import checkpoint
    from drt_fast.ensemble import Ensemble

    checkpoint.save_ensemble(str(path), Ensemble(member_list, mode=mode), arch=arch, dataset=dataset,
                             num_classes=num_classes, input_shape=input_shape,
                             normalization=normalization, sigma=sigma, train_config={"test": True})
    return str(path)


@functools.lru_cache(maxsize=None)
def digits_members() -> tuple:
    """Two digits_cnn members trained briefly at sigma 0.25 (cached for the session)."""
    from drt_fast import data

    train = data.load("digits", "train")
    means, sds = data.normalization("digits")
    ms = members("digits_cnn", 10, means, sds, count=2)
    train_gaussian(ms, train.x, train.y)
    return tuple(ms)


@functools.lru_cache(maxsize=None)
def digits_checkpoint() -> str:
    """A drt-fast ensemble file of :func:`digits_members` (dataset digits, sigma 0.25)."""
    from drt_fast import data

    return save(os.path.join(_WORK, "digits2.pt"), list(digits_members()), "digits_cnn", "digits", 10,
                (1, 8, 8), data.normalization("digits"))


@functools.lru_cache(maxsize=None)
def digits_npz() -> str:
    """The digits test split as an .npz with its idx: same rows and noise keys as
    ``--dataset digits``, but a subprocess reading it does not import scikit-learn."""
    from drt_fast import data

    test = data.load("digits", "test")
    return write_npz(os.path.join(_WORK, "digits_test.npz"), test.x.numpy(), test.y.numpy(),
                     idx=test.idx.numpy(), num_classes=10)


def write_npz(path, x, y, **extra) -> str:
    np.savez(path, x=np.asarray(x), y=np.asarray(y), **extra)
    return str(path)


def write_mnist(folder, images_u8, labels_u8, split="test") -> str:
    """MNIST idx files (LeCun's format) for ``split`` in ``folder``."""
    prefix = "t10k" if split == "test" else "train"
    os.makedirs(folder, exist_ok=True)
    n, h, w = images_u8.shape
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write((0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w)))
        f.write(np.ascontiguousarray(images_u8, dtype=np.uint8).tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write((0x0801).to_bytes(4, "big") + n.to_bytes(4, "big"))
        f.write(np.ascontiguousarray(labels_u8, dtype=np.uint8).tobytes())
    return str(folder)


def write_cifar(folder, images_u8, labels) -> str:
    """A CIFAR-10 python ``test_batch`` (dict with b'data' [N, 3072] uint8, b'labels')."""
    os.makedirs(folder, exist_ok=True)
    batch = {b"data": np.ascontiguousarray(images_u8.reshape(len(images_u8), -1), dtype=np.uint8),
             b"labels": [int(v) for v in labels], b"batch_label": b"testing batch 1 of 1"}
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return str(folder)


def run_cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m drt_fast ARGS`` in a subprocess, importing the drt_fast under test."""
    return subprocess.run([sys.executable, "-m", "drt_fast", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(**(env or {})), timeout=timeout, cwd=NEUTRAL_CWD)


def rows_without_time(path) -> list:
    """The lines of a results TSV split into fields, without the time column."""
    with open(path) as f:
        lines = [line.split("\t") for line in f.read().splitlines()]
    t = lines[0].index("time")
    return [fields[:t] + fields[t + 1:] for fields in lines]


class FakeTerminal(io.StringIO):
    """A stderr that says it is a terminal: where the progress bar is drawn."""

    def isatty(self):
        return True


def error_line(capsys) -> str:
    """The single stderr line of a failed command (asserting there is exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("drt-fast: error: ")
    return err[0]


@pytest.fixture(scope="module")
def ckpt():
    """`digits_checkpoint` (import this fixture into a test module to use it)."""
    return digits_checkpoint()


@pytest.fixture(scope="module")
def reference_tsv(ckpt, tmp_path_factory):
    """An uninterrupted certify run (`RUN`) that resume and data tests compare against."""
    from drt_fast.cli import main

    out = str(tmp_path_factory.mktemp("ref") / "ref.tsv")
    with single_thread():
        assert main(["certify", "--model", ckpt, *RUN, "--out", out]) == 0
    return out
