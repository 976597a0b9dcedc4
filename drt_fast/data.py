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
           (optional ``idx``, ``means``, ``sds``, ``num_classes``,
           ``grid``)
=========  =====================================================  ======================
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import DrtFastError, InvalidArgument, first_line

# Per-dataset (means, sds) of the NormalizeLayer.
# * cifar10, imagenet: the constants of Cohen et al.'s code, so their checkpoints match.
# * mnist: identity, as in the DRT public code (inherited from Jeong & Shin's
#   smoothing-consistency code, whose MNIST "normalize layer" is nn.Identity), so that its
#   LeNet checkpoints see the inputs they were trained on.
# * digits: mean and standard deviation of all pixels of our fixed training split
#   (pixels / 16), rounded to 4 digits and frozen here so that they never drift.
_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.3052,), (0.3760,)),
    "mnist": ((0.0,), (1.0,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_NAMES = ("digits", "mnist", "cifar10", "imagenet", "npz")

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                     ".webp")


def read_image(path: Path, transform) -> torch.Tensor:
    """Image ``path`` as RGB, through ``transform(img, PIL.Image) -> img``, as a float32
    ``[3, H, W]`` tensor in [0, 1]; DrtFastError when the file cannot be decoded."""
    Image = _pillow()
    try:
        with Image.open(path) as img:
            array = np.asarray(transform(img.convert("RGB"), Image), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DrtFastError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class LazyImages:
    """Images of a class-folder tree, decoded and preprocessed when indexed.

    Behaves like the ``x`` tensor of a `Dataset` for reading: ``len()``, ``.shape``
    ``(N, 3, 224, 224)``, ``.dtype``, and indexing by an int (-> ``[3, 224, 224]``), a
    slice, a list or an int tensor of indices (-> ``[k, 3, 224, 224]``), all float32 in
    [0, 1]. Nothing is cached: a full ImageNet validation set would need 30 GB.
    """

    def __init__(self, paths: Sequence[Path], resize: int = 256, crop: int = 224):
        self.paths = list(paths)
        self.resize, self.crop = resize, crop
        self.shape = torch.Size((len(self.paths), 3, crop, crop))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            return self._stack(range(len(self))[index])
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        if isinstance(index, (list, tuple, np.ndarray)):
            return self._stack(index)
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self._load(self.paths[index])

    def _stack(self, indices) -> torch.Tensor:
        items = [self[i] for i in indices]
        if not items:
            return torch.empty((0, 3, self.crop, self.crop))
        return torch.stack(items)

    def _load(self, path: Path) -> torch.Tensor:
        """Torchvision's ``Resize(256)`` (shorter side, bilinear) + ``CenterCrop(224)`` +
        ``ToTensor()``, with Pillow."""
        def resize_center_crop(img, Image):
            w, h = img.size
            # As torchvision: the shorter side becomes exact, the longer one truncates.
            if w <= h:
                size = (self.resize, int(self.resize * h / w))
            else:
                size = (int(self.resize * w / h), self.resize)
            img = img.resize(size, Image.BILINEAR)
            w, h = img.size
            left = int(round((w - self.crop) / 2.0))
            top = int(round((h - self.crop) / 2.0))
            return img.crop((left, top, left + self.crop, top + self.crop))
        return read_image(path, resize_center_crop)

    def __repr__(self) -> str:
        return f"LazyImages({len(self)} images, {self.resize}->{self.crop})"


@dataclass
class Dataset:
    """A labelled set of inputs in pixel space.

    x: ``[N, C, H, W]`` float32 in [0, 1] (a tensor, or `LazyImages` for image folders).
    y: ``[N]`` int64 labels in ``[0, num_classes)``.
    normalization: ``(means, sds)``, one value per channel, for the model's NormalizeLayer.
    idx: ``[N]`` int64 index of each row in its source split (``arange(N)`` unless the
      file says otherwise, e.g. an ``.npz`` holding a subset). Certification uses it as
      the input's noise key and in the results' ``idx`` column.
    classes_from_labels: ``num_classes`` was inferred as ``max(y) + 1`` (an ``.npz``
      without a ``num_classes`` entry), so it is a lower bound: a model with more classes
      fits the data (a subset whose labels miss the top classes).
    grid: the pixels' own grid, in steps per unit (pixels k / grid: 16 for digits' 0..16,
      255 for 8-bit images), or None where the file does not say (a float ``.npz`` without
      a ``grid`` entry). Discrete smoothing noise lives on it.
    """

    x: Union[torch.Tensor, LazyImages]
    y: torch.Tensor
    num_classes: int
    name: str
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    idx: Optional[torch.Tensor] = None
    classes_from_labels: bool = False
    grid: Optional[int] = None

    def __post_init__(self):
        if self.idx is None:
            self.idx = torch.arange(len(self.y), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.x.shape[1:])


def fingerprint(ds: Dataset) -> str:
    """A SHA-256 of what certification reads from ``ds``: every row's pixels (for image
    folders, each file's class folder, name and size), label and index. A results file
    records it, so that a resume refuses other data under the same name."""
    import hashlib

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


def names() -> list[str]:
    """Dataset names `load` accepts."""
    return list(_NAMES)


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(means, sds)`` per channel for dataset ``name`` (see the table in the source)."""
    if name == "npz":
        raise DrtFastError("an .npz dataset has no fixed normalization; it is read from "
                           "the file's 'means'/'sds' arrays (identity when absent)")
    if name not in _NORMALIZATION:
        raise InvalidArgument(f"unknown dataset {name!r}; expected one of {', '.join(_NAMES)}")
    return _NORMALIZATION[name]


def load(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load dataset ``name``'s ``split`` from ``data_dir`` (see the module docstring)."""
    if name == "digits":
        return _digits(split)
    if name == "npz":
        if data_dir is None:
            raise DrtFastError("dataset 'npz' needs the path of the .npz file as data_dir")
        return _npz(Path(data_dir))
    if name not in _NAMES:
        raise InvalidArgument(f"unknown dataset {name!r}; expected one of {', '.join(_NAMES)}")
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
    loader = {"mnist": _mnist, "cifar10": _cifar10, "imagenet": _imagenet}[name]
    return loader(split, data_dir)


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DrtFastError(f"dataset {name!r} has splits {', '.join(allowed)}; got {split!r}")


# ----------------------------------------------------------------------------- digits

def _digits(split: str) -> Dataset:
    """scikit-learn's 1797 8x8 digits, pixels / 16, a fixed stratified 75/25 split."""
    _check_split("digits", split, ("train", "test"))
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]          # [1797, 1, 8, 8]
    y = digits.target.astype(np.int64)
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(index, test_size=0.25, random_state=0,
                                           stratify=y)
    rows = train_idx if split == "train" else test_idx
    return Dataset(x=torch.from_numpy(x[rows]), y=torch.from_numpy(y[rows]), num_classes=10,
                   name="digits", normalization=_NORMALIZATION["digits"], grid=16)


# ------------------------------------------------------------------------------ mnist

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(name: str, folders: Sequence[Path], dataset: str,
               allow_gz: bool = False) -> Path:
    candidates = [name, name + ".gz"] if allow_gz else [name]
    for folder in folders:
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    where = " or ".join(str(f) for f in folders)
    also = f" (or {name}.gz)" if allow_gz else ""
    raise DrtFastError(f"{dataset}: expected file {name}{also} in {where}; not found")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
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


def _mnist(split: str, data_dir: Path) -> Dataset:
    _check_split("mnist", split, ("train", "test"))
    folders = [data_dir, data_dir / "MNIST" / "raw"]
    image_name, label_name = _MNIST_FILES[split]
    images = _read_idx(_find_file(image_name, folders, "mnist", allow_gz=True), ndim=3)
    labels = _read_idx(_find_file(label_name, folders, "mnist", allow_gz=True), ndim=1)
    if len(images) != len(labels):
        raise DrtFastError(f"mnist {split}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DrtFastError(f"mnist {split}: labels must be 0..9, found {int(labels.max())}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)   # [N, 1, H, W]
    return Dataset(x=x, y=torch.from_numpy(labels.astype(np.int64)), num_classes=10,
                   name="mnist", normalization=_NORMALIZATION["mnist"], grid=255)


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


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
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


def _cifar10(split: str, data_dir: Path) -> Dataset:
    _check_split("cifar10", split, ("train", "test"))
    folders = [data_dir, data_dir / "cifar-10-batches-py"]
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_read_cifar_batch(_find_file(name, folders, "cifar10")) for name in files]
    x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    y = np.concatenate([p[1] for p in parts])
    return Dataset(x=torch.from_numpy(x), y=torch.from_numpy(y), num_classes=10,
                   name="cifar10", normalization=_NORMALIZATION["cifar10"], grid=255)


# --------------------------------------------------------------------------- imagenet

def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise DrtFastError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def _imagenet(split: str, data_dir: Path) -> Dataset:
    """Class folders ``data_dir/<split>/<wnid>/``; labels index the sorted folder names,
    so the tree must hold every class folder (as torchvision's ImageFolder assumes)."""
    _check_split("imagenet", split, ("train", "val", "test"))
    _pillow()   # fail now, not at the first image
    root = data_dir / ("val" if split == "test" else split)
    if not root.is_dir():
        raise DrtFastError(f"imagenet: expected folder {root.name}/ of class folders in "
                           f"{data_dir}; not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DrtFastError(f"imagenet: no class folders in {root}")
    paths, labels = [], []
    for label, wnid in enumerate(classes):
        # torchvision's ImageFolder order: sub-folders too, each folder's files sorted
        for folder, _, names in sorted(os.walk(root / wnid, followlinks=True)):
            for name in sorted(names):
                path = Path(folder) / name
                if path.suffix.lower() in _IMAGE_EXTENSIONS and path.is_file():
                    paths.append(path)
                    labels.append(label)
    if not paths:
        raise DrtFastError(f"imagenet: no images ({', '.join(_IMAGE_EXTENSIONS)}) under {root}")
    return Dataset(x=LazyImages(paths), y=torch.tensor(labels, dtype=torch.int64),
                   num_classes=len(classes), name="imagenet",
                   normalization=_NORMALIZATION["imagenet"], grid=255)


# -------------------------------------------------------------------------------- npz

def _npz(path: Path) -> Dataset:
    """``x``: ``[N, C, H, W]`` (or ``[N, H, W]``, one channel) float in [0, 1] or uint8
    0..255; ``y``: ``[N]`` integer labels. Optional: ``idx`` ``[N]`` (row index in the
    source split), ``means``/``sds`` ``[C]`` (identity normalization when absent),
    ``num_classes`` (when absent, ``max(y) + 1``, taken as a lower bound: a model with more
    classes fits the file), ``grid`` (the pixels' steps per unit; uint8 x: 255)."""
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
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:   # zipfile/numpy: BadZipFile, zlib.error, NotImplementedError, ...
        raise DrtFastError(f"cannot read {path} as .npz: {first_line(exc)}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DrtFastError(f"{path}: expected an array {key!r}; the file holds "
                               f"{sorted(arrays) or 'nothing'}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise DrtFastError(f"{path}: x must be [N, C, H, W] or [N, H, W], got shape "
                           f"{list(x.shape)}")
    if len(x) == 0:
        raise DrtFastError(f"{path}: x holds no inputs (shape {list(x.shape)})")
    grid = 255 if x.dtype == np.uint8 else None
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DrtFastError(f"{path}: float x must be finite pixels in [0, 1], found "
                               f"NaN or inf")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DrtFastError(f"{path}: float x must be pixels in [0, 1], got range "
                               f"[{x.min():.4g}, {x.max():.4g}]")
    else:
        raise DrtFastError(f"{path}: x must be float in [0, 1] or uint8, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DrtFastError(f"{path}: y must be {len(x)} integer labels, got {y.dtype} "
                           f"{list(y.shape)}")
    if y.size and y.min() < 0:
        raise DrtFastError(f"{path}: labels must be >= 0, found {int(y.min())}")
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
    if "grid" in arrays:
        given = arrays["grid"]
        if (given.size != 1 or not np.issubdtype(given.dtype, np.number)
                or not float(given.ravel()[0]).is_integer() or not 1 <= given.ravel()[0] <= 2**20):
            raise DrtFastError(f"{path}: grid must be one integer in [1, 2^20] (steps per unit: "
                               f"pixels k / grid), got {given.dtype} {given.ravel()[:4].tolist()}")
        grid = int(given.ravel()[0])
    idx = None
    if "idx" in arrays:
        idx = arrays["idx"]
        if idx.shape != (len(x),) or not np.issubdtype(idx.dtype, np.integer):
            raise DrtFastError(f"{path}: idx must be {len(x)} integers, got {idx.dtype} "
                               f"{list(idx.shape)}")
        if idx.min() < 0 or len(np.unique(idx)) != len(idx):
            raise DrtFastError(f"{path}: idx must be distinct indices >= 0 (each row's index "
                               f"in its split: the noise key and the results' idx)")
        idx = torch.from_numpy(idx.astype(np.int64))
    return Dataset(x=torch.from_numpy(np.ascontiguousarray(x)),
                   y=torch.from_numpy(y.astype(np.int64)), num_classes=num_classes,
                   name="npz", normalization=(means, sds), idx=idx,
                   classes_from_labels="num_classes" not in arrays, grid=grid)
