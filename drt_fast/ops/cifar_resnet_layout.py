"""The data layouts of the CIFAR ResNet kernel (csrc/cuda/cifar_resnet.cu), in torch.

The order of a network's convolutions (`cifar_resnet_convs`), how their weights are packed
as the kernel's 16x16 bf16 tiles (`pack_cifar_resnet_weight` and its inverse), and how to
read activation maps out of a snapshot of a draw's shared memory (`cifar_resnet_map`; the
snapshot comes from `drt_fast.ops.cifar_resnet_snapshot`).
"""
import torch
from torch import Tensor

CIFAR_RESNET_VARIANTS = ("wmma", "mma")   # the kernel's tensor-core paths: variant 0 and 1

# Byte offsets of the kernel's shared-memory regions 0, 1 and 2 (cifar_resnet.cu).
CIFAR_RESNET_REGIONS = (0, 36_992, 57_728)


def cifar_resnet_convs(blocks: int) -> list:
    """``(cin, cout, taps, stride, kind)`` of every convolution of a CIFAR ResNet with
    ``blocks`` BasicBlocks a stage, in the kernel's order (its weights and biases follow it):
    the stem (3 input channels padded to 16), then per block conv1 (``"relu"``), at a stage's
    entry the 1x1 downsample (``"linear"``), and conv2 (``"residual"``: + the block's input,
    then ReLU)."""
    convs = [(16, 16, 9, 1, "relu")]
    for s in range(3):
        ch = 16 << s
        for b in range(blocks):
            if s and b == 0:
                convs += [(ch // 2, ch, 9, 2, "relu"), (ch // 2, ch, 1, 2, "linear")]
            else:
                convs.append((ch, ch, 9, 1, "relu"))
            convs.append((ch, ch, 9, 1, "residual"))
    return convs


def mma_tile_order() -> Tensor:
    """The mma.sync variant's packed 16x16 tile: element ``lane*8 + half*4 + reg*2 + j`` is
    the row-major tile's ``[k = 2t + 8 reg + j][n = 8 half + g]`` (g = lane // 4, t = lane % 4:
    PTX's B fragment of m16n8k16, so that each lane loads its 16 bytes at once)."""
    lane, half, reg, j = torch.meshgrid(*(torch.arange(n) for n in (32, 2, 2, 2)), indexing="ij")
    return ((2 * (lane % 4) + 8 * reg + j) * 16 + 8 * half + lane // 4).reshape(-1)


def pack_cifar_resnet_weight(w: Tensor, variant: int = 0) -> Tensor:
    """A convolution's weight ``[cout, cin, k, k]`` (cin a multiple of 16) as the kernel's
    16x16 tiles, flat: tap, then input chunk, then output chunk; each tile is
    [input channel][output channel], row-major (variant 0, wmma) or in the mma.sync
    fragment order (variant 1, `mma_tile_order`)."""
    cout, cin, kh, kw = w.shape
    tiles = (w.permute(2, 3, 1, 0).reshape(kh * kw, cin // 16, 16, cout // 16, 16)
             .permute(0, 1, 3, 2, 4).reshape(-1, 256))
    if variant == 1:
        tiles = tiles[:, mma_tile_order()]
    return tiles.reshape(-1)


def unpack_cifar_resnet_weight(tiles: Tensor, cin: int, cout: int, taps: int, variant: int = 0) -> Tensor:
    """Inverse of `pack_cifar_resnet_weight`."""
    k = 3 if taps == 9 else 1
    tiles = tiles.view(-1, 256)
    if variant == 1:
        tiles = tiles[:, torch.argsort(mma_tile_order())]
    return (tiles.reshape(taps, cin // 16, cout // 16, 16, 16).permute(0, 1, 3, 2, 4)
            .reshape(taps, cin, cout).permute(2, 1, 0).reshape(cout, cin, k, k))


def cifar_resnet_map(snapshot: Tensor, variant: int, region: int, grid: int, channels: int) -> Tensor:
    """The activation map of ``channels`` channels on grid ``grid`` (0, 1, 2: 32, 16, 8
    pixels a side) stored in ``region`` of `cifar_resnet_snapshot` rows: float ``[B, C, H, W]``
    (the interior pixels; planes of 16 channels on the zero-padded grid, cifar_resnet.cu `at`)."""
    side = 32 >> grid
    pitch = side + 2
    positions = 110 if grid == 2 else pitch * pitch
    start = CIFAR_RESNET_REGIONS[region]
    raw = snapshot[:, start:start + channels // 16 * positions * 32].contiguous().view(torch.bfloat16).float()
    planes = raw.view(-1, channels // 16, positions, 16)
    if variant == 1:                      # halves of 8 channels swapped at every other 4 positions
        swapped = ((torch.arange(positions, device=raw.device) >> 2) & 1).bool()
        halves = planes.view(*planes.shape[:3], 2, 8)
        halves = torch.where(swapped[None, None, :, None, None], halves.flip(3), halves)
        planes = halves.reshape(planes.shape)
    rows = torch.arange(1, side + 1, device=raw.device)
    index = (rows[:, None] * pitch + rows[None, :]).reshape(-1)
    interior = planes[:, :, index, :]     # [B, planes, H*W, 16]
    return interior.permute(0, 1, 3, 2).reshape(-1, channels, side, side)
