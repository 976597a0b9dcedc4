"""Training inputs: the batches of an epoch, with the data augmentation of Cohen et al.'s code.

``--augment`` (``auto`` picks what Cohen et al.'s ``train.py`` does for the dataset):

* ``none``       — the inputs as they are (digits, mnist and npz by default);
* ``crop-flip``  — pad 4 pixels with zeros, crop back at a random offset, flip left-right
  with probability 1/2 (torchvision's ``RandomCrop(32, padding=4)`` +
  ``RandomHorizontalFlip()``; cifar10 by default); for inputs held in memory, applied on
  the device to each batch;
* ``resized-crop-flip`` — a random crop of 8-100 % of the image's area and aspect ratio
  3/4-4/3, resized to 224x224 (bilinear), flipped with probability 1/2 (torchvision's
  ``RandomResizedCrop(224)`` + ``RandomHorizontalFlip()``; imagenet by default); for image
  folders, decoded in DataLoader worker processes (``--workers``). With ``none`` an image
  folder gives the evaluation view (resize 256, center crop 224).

Every random choice is a pure function of (seed, epoch, input index), so the batches of an
epoch do not depend on the number of processes or workers, and ``--resume`` repeats them.
Image folders are never held in memory: each rank decodes only its share of each batch.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import LazyImages, read_image
from ..errors import DrtFastError

AUGMENTS = ("auto", "none", "crop-flip", "resized-crop-flip")
_DEFAULT = {"cifar10": "crop-flip", "imagenet": "resized-crop-flip"}
CROP_PAD = 4
FOLDER_EVAL_BATCH = 100      # the most images of an evaluation batch decoded from image folders
# the third SeedSequence word of the augmentation's stream (ranks use small ones: no collision)
_AUGMENT_STREAM = 2**32 - 1


def resolve_augment(name: str, dataset: str, in_memory: bool) -> str:
    """The augmentation ``--augment name`` means for ``dataset`` (``auto``: Cohen's default);
    DrtFastError where it does not apply to how the data is held."""
    if name not in AUGMENTS:
        raise DrtFastError(f"--augment must be one of {', '.join(AUGMENTS)}, got {name!r}")
    if name == "auto":
        return _DEFAULT.get(dataset, "none")
    if name == "resized-crop-flip" and in_memory:
        raise DrtFastError(f"--augment resized-crop-flip is for image folders (imagenet); "
                           f"{dataset} is held in memory: use crop-flip or none")
    if name == "crop-flip" and not in_memory:
        raise DrtFastError(f"--augment crop-flip is for datasets held in memory; {dataset} is "
                           f"read from image folders: use resized-crop-flip or none")
    return name


def _seed(seed: int, epoch: int, index: int | None = None) -> list[int]:
    return [seed, epoch, _AUGMENT_STREAM] + ([] if index is None else [index])


def crop_flip_plan(n: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input of an epoch: the crop's (row, column) offset in the padded image
    ``[n, 2]`` in ``[0, 2*CROP_PAD]``, and whether it is flipped ``[n]``."""
    state = np.random.SeedSequence(_seed(seed, epoch)).generate_state(2, np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] >> 1))
    offsets = torch.randint(0, 2 * CROP_PAD + 1, (n, 2), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen).bool()
    return offsets, flips


def crop_flip(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W]`` zero-padded by CROP_PAD, cropped back to H x W at ``offsets [B, 2]``
    and flipped left-right where ``flips [B]`` (on x's device)."""
    b, _, h, w = x.shape
    offsets, flips = offsets.to(x.device), flips.to(x.device)
    padded = F.pad(x, (CROP_PAD,) * 4)
    rows = offsets[:, :1] + torch.arange(h, device=x.device)            # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=x.device)            # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]          # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def resized_crop_box(width: int, height: int, rng: np.random.Generator,
                     scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(left, top, width, height)`` of a crop
    of a random fraction ``scale`` of the area and aspect ratio in ``ratio`` (log-uniform);
    after 10 misses, the largest central crop within ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class _Failed:
    """A worker's DrtFastError, carried back as a value (a raised one would arrive wrapped in
    the worker's traceback)."""

    def __init__(self, message: str):
        self.message = message


class _FolderImages(torch.utils.data.Dataset):
    """Images of a `LazyImages` tree for one epoch: the random resized crop (seeded by seed,
    epoch, index), or the evaluation view."""

    def __init__(self, images: LazyImages, augment: str, seed: int, epoch: int):
        self.images, self.augment, self.seed, self.epoch = images, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            if self.augment == "none":
                return self.images[index]
            rng = np.random.default_rng(_seed(self.seed, self.epoch, int(index)))
            size = self.images.crop

            def transform(img, Image):
                left, top, w, h = resized_crop_box(img.width, img.height, rng)
                # crop, then resize, as torchvision: resize(box=...) would let the filter
                # reach pixels outside the box at the crop's edges
                img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
                return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img
            return read_image(self.images.paths[index], transform)
        except DrtFastError as err:
            return _Failed(str(err))


def _collate(items: list):
    for item in items:
        if isinstance(item, _Failed):
            return item
    return torch.stack(items)


def _folder_loader(dataset, index_lists: Sequence[Sequence[int]], workers: int, device: torch.device):
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=index_lists, num_workers=workers,
                                         collate_fn=_collate, pin_memory=device.type == "cuda")
    for batch in loader:
        if isinstance(batch, _Failed):
            raise DrtFastError(batch.message)
        yield batch.to(device, non_blocking=True)


class TrainInputs:
    """The training set of a run on ``device``, batch by batch.

    ``x``: a tensor (moved to the device once) or `LazyImages` (decoded per batch).
    """

    def __init__(self, x, y: torch.Tensor, augment: str, seed: int, device: torch.device,
                 workers: int = 0):
        self.in_memory = isinstance(x, torch.Tensor)
        self.x = x.to(device) if self.in_memory else x
        self.y = y.to(device)
        self.augment, self.seed, self.device, self.workers = augment, seed, device, workers

    def __len__(self) -> int:
        return len(self.y)

    def epoch(self, epoch: int, index_lists: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` on the device for each list of input indices (this rank's shares of the
        epoch's batches), augmented as configured."""
        if self.in_memory:
            plan = crop_flip_plan(len(self), self.seed, epoch) if self.augment == "crop-flip" else None
            for idx in index_lists:
                on_device = idx.to(self.device)
                x = self.x[on_device]
                if plan is not None:
                    x = crop_flip(x, plan[0][idx], plan[1][idx])
                yield x, self.y[on_device]
            return
        dataset = _FolderImages(self.x, self.augment, self.seed, epoch)
        lists = [idx.tolist() for idx in index_lists]
        for x, idx in zip(_folder_loader(dataset, lists, self.workers, self.device), lists):
            yield x, self.y[torch.as_tensor(idx, device=self.device)]


def eval_batches(x, batch: int, device: torch.device, workers: int = 0, start: int = 0,
                 stop: int | None = None) -> Iterator[torch.Tensor]:
    """``x[start:stop]`` (a tensor or `LazyImages`, evaluation view) in consecutive batches on
    ``device``."""
    stop = len(x) if stop is None else stop
    if isinstance(x, torch.Tensor):
        for s in range(start, stop, batch):
            yield x[s:min(s + batch, stop)].to(device)
        return
    # Decoded images are big and the loader keeps 2 batches a worker in flight: small batches
    # bound the host memory (figures in bench/RESULTS.md, "Training inputs and the digits CNN").
    batch = min(batch, FOLDER_EVAL_BATCH)
    lists = [list(range(s, min(s + batch, stop))) for s in range(start, stop, batch)]
    yield from _folder_loader(_FolderImages(x, "none", 0, 0), lists, workers, device)
