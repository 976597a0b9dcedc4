"""Datasets in their distribution files: MNIST's idx files and CIFAR-10's python pickles."""
from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DrtFastError, first_line
from .dataset import NORMALIZATION, Dataset, check_split


def find_file(name: str, folders: Sequence[Path], dataset: str, allow_gz: bool = False) -> Path:
    """The first of ``folders`` holding file ``name`` (or ``name.gz`` with ``allow_gz``);
    DrtFastError naming the file and the folders when none does."""
    candidates = [name, name + ".gz"] if allow_gz else [name]
    for folder in folders:
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    where = " or ".join(str(f) for f in folders)
    also = f" (or {name}.gz)" if allow_gz else ""
    raise DrtFastError(f"{dataset}: expected file {name}{also} in {where}; not found")


# ------------------------------------------------------------------------------ mnist

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions (LeCun's format:
    two zero bytes, type code 0x08, ndim, then ndim big-endian uint32 sizes, then data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as exc:   # zlib: corrupt .gz data
        raise DrtFastError(f"cannot read idx file {path}: {exc}") from None
    header = 4 + 4 * ndim
    expected_magic = 0x0800 + ndim
    if len(raw) < 4:
        raise DrtFastError(f"{path} is not an idx file: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DrtFastError(f"{path} is not an idx file of {ndim}-d unsigned bytes: magic "
                           f"number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    if len(raw) < header:
        raise DrtFastError(f"{path} is truncated: {len(raw)} bytes, header needs {header}")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise DrtFastError(f"{path} has {len(raw) - header} data bytes, expected "
                           f"{size} for shape {tuple(dims)} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(split: str, data_dir: Path) -> Dataset:
    """MNIST's idx files (optionally gzipped) in ``data_dir`` or ``data_dir/MNIST/raw``."""
    check_split("mnist", split, ("train", "test"))
    folders = [data_dir, data_dir / "MNIST" / "raw"]
    image_name, label_name = _MNIST_FILES[split]
    images = read_idx(find_file(image_name, folders, "mnist", allow_gz=True), ndim=3)
    labels = read_idx(find_file(label_name, folders, "mnist", allow_gz=True), ndim=1)
    if len(images) != len(labels):
        raise DrtFastError(f"mnist {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DrtFastError(f"mnist {split}: labels must be 0..9, found {int(labels.max())}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)   # [N, 1, H, W]
    return Dataset(x=x, y=torch.from_numpy(labels.astype(np.int64)), num_classes=10,
                   name="mnist", normalization=NORMALIZATION["mnist"], grid=255)


# ---------------------------------------------------------------------------- cifar10

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold (dicts, lists, bytes, numpy arrays), so that
    a malicious "dataset" file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: (uint8 ``[N, 3, 32, 32]``, int64 ``[N]`` labels)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:   # a damaged pickle fails in many ways (OverflowError, MemoryError, ...)
        raise DrtFastError(f"cannot read CIFAR-10 batch {path}: {first_line(exc)}") from None
    if isinstance(batch, dict):     # the original files have bytes keys; a re-save in Python 3, str
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DrtFastError(f"{path} is not a CIFAR-10 python batch (a dict with b'data' "
                           f"and b'labels')")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DrtFastError(f"{path}: data must be uint8 [N, 3072], got {data.dtype} "
                           f"{list(data.shape)}")
    if labels.shape != (len(data),) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DrtFastError(f"{path}: labels must be {len(data)} integers in 0..9, got shape "
                           f"{list(labels.shape)}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(split: str, data_dir: Path) -> Dataset:
    """CIFAR-10's python batches in ``data_dir`` or ``data_dir/cifar-10-batches-py``."""
    check_split("cifar10", split, ("train", "test"))
    folders = [data_dir, data_dir / "cifar-10-batches-py"]
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [read_cifar_batch(find_file(name, folders, "cifar10")) for name in files]
    x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y = np.concatenate([p[1] for p in parts])
    return Dataset(x=torch.from_numpy(x), y=torch.from_numpy(y), num_classes=10,
                   name="cifar10", normalization=NORMALIZATION["cifar10"], grid=255)
