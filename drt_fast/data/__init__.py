"""Datasets, read from local files in their usual formats. Nothing is ever downloaded.

``load(name, split="test", data_dir=None) -> Dataset`` with ``x`` float32
``[N, C, H, W]`` pixels in [0, 1] and ``y`` int64 ``[N]``. Normalization is *not* applied
here: it is the first layer of every model (`drt_fast.models.NormalizeLayer`), so that
smoothing noise is added in pixel space; ``Dataset.normalization`` says which means/sds
that layer should use.

=========  =====================================================  ======================
name       files                                                  splits
=========  =====================================================  ======================
digits     scikit-learn's bundled 8x8 digits (no files)           train, test
mnist      ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``  train, test
           in ``data_dir`` or ``data_dir/MNIST/raw``
cifar10    ``data_batch_1..5``, ``test_batch`` (python pickles)   train, test
           in ``data_dir`` or ``data_dir/cifar-10-batches-py``
imagenet   ``data_dir/<split>/<wnid>/<image>``; "test" reads      train, val (= test)
           ``val``; resize 256 + center crop 224; loaded lazily
npz        ``data_dir`` is the ``.npz`` file: ``x``, ``y``          (one set; split unused)
           (optional ``idx``, ``means``, ``sds``, ``num_classes``)
=========  =====================================================  ======================

One module a format family: `arrays` (digits, ``.npz``), `files` (MNIST idx, CIFAR-10
pickles), `images` (image folders, `LazyImages`); `dataset` holds `Dataset` and the
named datasets' normalizations.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import DrtFastError, InvalidArgument
from .arrays import load_digits, load_npz
from .dataset import NAMES, Dataset, names, normalization
from .files import load_cifar10, load_mnist
from .images import LazyImages, load_imagenet, read_image

__all__ = ["load", "Dataset", "LazyImages", "fingerprint", "names", "normalization", "read_image"]


def load(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name``'s ``split`` from ``data_dir`` (see the module docstring)."""
    if name == "digits":
        return load_digits(split)
    if name == "npz":
        if data_dir is None:
            raise DrtFastError("dataset 'npz' needs the path of the .npz file as data_dir")
        return load_npz(Path(data_dir))
    if name not in NAMES:
        raise InvalidArgument(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    if data_dir is None and name == "imagenet":
        # Cohen et al.'s code reads the ImageNet location from this variable.
        data_dir = os.environ.get("IMAGENET_DIR")
    if data_dir is None:
        raise DrtFastError(f"dataset {name!r} needs a data directory (--data-dir); "
                           f"none was given")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DrtFastError(f"data directory {data_dir} for dataset {name!r} does not exist "
                           f"or is not a directory")
    loader = {"mnist": load_mnist, "cifar10": load_cifar10, "imagenet": load_imagenet}[name]
    return loader(split, data_dir)


def fingerprint(ds: Dataset) -> str:
    """A SHA-256 of what certification reads from ``ds``: every row's pixels (for image
    folders, each file's class folder, name and size), label and index. A results file
    records it, so that a resume refuses other data under the same name."""
    digest = hashlib.sha256()
    if isinstance(ds.x, LazyImages):
        for path in ds.x.paths:
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise DrtFastError(f"cannot read {path}: {exc.strerror or exc}") from None
            digest.update(f"{path.parent.name}/{path.name}:{size}\n".encode())
    else:
        x = ds.x.detach().cpu().contiguous()
        digest.update(str((str(x.dtype), tuple(x.shape))).encode())
        digest.update(x.view(torch.uint8).reshape(-1).numpy().data if x.numel() else b"")
    for t in (ds.y, ds.idx):
        digest.update(torch.as_tensor(t).to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()
