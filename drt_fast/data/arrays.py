"""Datasets held in arrays: scikit-learn's bundled digits and ``.npz`` files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DrtFastError, first_line
from .dataset import NORMALIZATION, Dataset, check_split


def load_digits(split: str) -> Dataset:
    """scikit-learn's 1797 8x8 digits, pixels / 16, a fixed stratified 75/25 split."""
    check_split("digits", split, ("train", "test"))
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]          # [1797, 1, 8, 8]
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(index, test_size=0.25, random_state=0,
                                           stratify=y)
    rows = train_idx if split == "train" else test_idx
    return Dataset(x=torch.from_numpy(x[rows]), y=torch.from_numpy(y[rows]), num_classes=10,
                   name="digits", normalization=NORMALIZATION["digits"], grid=16)


def load_npz(path: Path) -> Dataset:
    """``x``: ``[N, C, H, W]`` (or ``[N, H, W]``, one channel) float in [0, 1] or uint8
    0..255; ``y``: ``[N]`` integer labels. Optional: ``idx`` ``[N]`` (row index in the
    source split), ``means``/``sds`` ``[C]`` (identity normalization when absent),
    ``num_classes`` (when absent, ``max(y) + 1``, taken as a lower bound: a model with more
    classes fits the file), ``grid`` (the pixels' steps per unit; uint8 x: 255). Every entry
    is checked, in that order, with a message naming it."""
    arrays = _read_npz(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise DrtFastError(f"{path}: expected an array {key!r}; the file holds "
                               f"{sorted(arrays) or 'nothing'}")
    grid = 255 if arrays["x"].dtype == np.uint8 else None
    x = _pixels(arrays["x"], path)
    y = arrays["y"]
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DrtFastError(f"{path}: y must be {len(x)} integer labels, got {y.dtype} "
                           f"{list(y.shape)}")
    if y.size and y.min() < 0:
        raise DrtFastError(f"{path}: labels must be >= 0, found {int(y.min())}")
    num_classes = _num_classes(arrays, y, path)
    normalization = _normalization(arrays, x, path)
    idx = _row_indices(arrays, len(x), path)
    grid = _grid(arrays, path, grid)
    return Dataset(x=torch.from_numpy(np.ascontiguousarray(x)),
                   y=torch.from_numpy(y.astype(np.int64)), num_classes=num_classes,
                   name="npz", normalization=normalization, idx=idx,
                   classes_from_labels="num_classes" not in arrays,
                   own_normalization="means" in arrays or "sds" in arrays, grid=grid)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file ``path`` (no pickles)."""
    if path.is_dir():
        raise DrtFastError(f"npz: {path} is a folder; dataset 'npz' reads one .npz file, "
                           f"given as the data path itself")
    if not path.is_file():
        raise DrtFastError(f"npz: expected file {path.name} in {path.parent}; not found")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DrtFastError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != b"PK\x03\x04":                   # an .npz is a zip archive of .npy arrays
        raise DrtFastError(f"cannot read {path} as .npz: it is not a zip archive of arrays "
                           f"(write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as exc:   # zipfile/numpy: BadZipFile, zlib.error, NotImplementedError, ...
        raise DrtFastError(f"cannot read {path} as .npz: {first_line(exc)}") from None


def _pixels(x: np.ndarray, path: Path) -> np.ndarray:
    """The file's ``x`` as float32 ``[N, C, H, W]`` in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DrtFastError(f"{path}: x must be [N, C, H, W] or [N, H, W], got shape "
                           f"{list(x.shape)}")
    if len(x) == 0:
        raise DrtFastError(f"{path}: x holds no inputs (shape {list(x.shape)})")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise DrtFastError(f"{path}: x must be float in [0, 1] or uint8, got {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DrtFastError(f"{path}: float x must be finite pixels in [0, 1], found "
                           f"NaN or inf")
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise DrtFastError(f"{path}: float x must be pixels in [0, 1], got range "
                           f"[{x.min():.4g}, {x.max():.4g}]")
    return x


def _num_classes(arrays: dict[str, np.ndarray], y: np.ndarray, path: Path) -> int:
    """The file's ``num_classes``, else ``max(y) + 1``; every label must be below it."""
    if "num_classes" in arrays:
        given = arrays["num_classes"]
        if (given.size != 1 or not np.issubdtype(given.dtype, np.number)
                or not float(given.ravel()[0]).is_integer() or given.ravel()[0] < 1):
            raise DrtFastError(f"{path}: num_classes must be one integer >= 1, got {given.dtype} "
                               f"{given.ravel()[:4].tolist()}")
        num_classes = int(given.ravel()[0])
    else:
        num_classes = int(y.max(initial=-1)) + 1
    if y.size and y.max() >= num_classes:
        raise DrtFastError(f"{path}: labels must be below num_classes={num_classes}, found "
                           f"{int(y.max())}")
    return num_classes


def _normalization(arrays: dict[str, np.ndarray], x: np.ndarray, path: Path):
    """``(means, sds)`` from the file (identity where absent), one value per channel of ``x``."""
    channels = x.shape[1]
    for key in ("means", "sds"):
        if key in arrays and not (np.issubdtype(arrays[key].dtype, np.number)
                                  and np.isfinite(arrays[key]).all()):
            raise DrtFastError(f"{path}: {key} must be finite numbers, got {arrays[key].dtype}")
    means = tuple(float(v) for v in arrays.get("means", np.zeros(channels)).ravel())
    sds = tuple(float(v) for v in arrays.get("sds", np.ones(channels)).ravel())
    if len(means) != channels or len(sds) != channels or min(sds) <= 0:
        # x written as N, H, W, C (numpy/PIL/Keras order) is read with H as the channels
        layout = (f"; x has shape {list(x.shape)}: if that is N, H, W, C, write it as N, C, H, W "
                  f"(x.transpose(0, 3, 1, 2))"
                  if len(means) == len(sds) == x.shape[3] != channels else "")
        raise DrtFastError(f"{path}: means/sds must hold {channels} values (sds > 0), got "
                           f"{len(means)} and {len(sds)}{layout}")
    return means, sds


def _grid(arrays: dict[str, np.ndarray], path: Path, default):
    """The file's ``grid`` (steps per unit of its pixels), else ``default``."""
    if "grid" not in arrays:
        return default
    given = arrays["grid"]
    if (given.size != 1 or not np.issubdtype(given.dtype, np.number)
            or not float(given.ravel()[0]).is_integer() or not 1 <= given.ravel()[0] <= 2**20):
        raise DrtFastError(f"{path}: grid must be one integer in [1, 2^20] (steps per unit: "
                           f"pixels k / grid), got {given.dtype} {given.ravel()[:4].tolist()}")
    return int(given.ravel()[0])


def _row_indices(arrays: dict[str, np.ndarray], n: int, path: Path) -> torch.Tensor | None:
    """The file's ``idx`` as int64 ``[n]`` (None when absent: ``arange(n)``)."""
    if "idx" not in arrays:
        return None
    idx = arrays["idx"]
    if idx.shape != (n,) or not np.issubdtype(idx.dtype, np.integer):
        raise DrtFastError(f"{path}: idx must be {n} integers, got {idx.dtype} "
                           f"{list(idx.shape)}")
    if idx.min() < 0 or len(np.unique(idx)) != len(idx):
        raise DrtFastError(f"{path}: idx must be distinct indices >= 0 (each row's index "
                           f"in its split: the noise key and the results' idx)")
    return torch.from_numpy(idx.astype(np.int64))
