"""Image-folder datasets (``imagenet``): class folders, decoded lazily with Pillow."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import DrtFastError
from .dataset import NORMALIZATION, Dataset, check_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                    ".webp")


def pillow():
    """``PIL.Image``; DrtFastError naming the package when Pillow is not installed."""
    try:
        from PIL import Image
    except ImportError:
        raise DrtFastError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def read_image(path: Path, transform) -> torch.Tensor:
    """Image ``path`` as RGB, through ``transform(img, PIL.Image) -> img``, as a float32
    ``[3, H, W]`` tensor in [0, 1]; DrtFastError when the file cannot be decoded."""
    Image = pillow()
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


def load_imagenet(split: str, data_dir: Path) -> Dataset:
    """Class folders ``data_dir/<split>/<wnid>/``; labels index the sorted folder names,
    so the tree must hold every class folder (as torchvision's ImageFolder assumes)."""
    check_split("imagenet", split, ("train", "val", "test"))
    pillow()   # fail now, not at the first image
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
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    paths.append(path)
                    labels.append(label)
    if not paths:
        raise DrtFastError(f"imagenet: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return Dataset(x=LazyImages(paths), y=torch.tensor(labels, dtype=torch.int64),
                   num_classes=len(classes), name="imagenet",
                   normalization=NORMALIZATION["imagenet"], grid=255)
