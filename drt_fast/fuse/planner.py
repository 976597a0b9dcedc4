"""The block plan of the CPU's dense-chain kernel (`drt_fast.ops.dense_chain`; layout in
csrc/kernels.h DenseChainArgs).

A dense member that is float32 matrices each followed by at most a ReLU (`chain_layers`)
runs as one kernel call: tiles of rows go through every layer in the core's cache, and each
block of a matrix multiplies only the band of inputs its outputs depend on, skipping most
of a convolution's zeros. `column_groups` chooses a matrix's blocks, `chain_plan` lays the
layers out for the kernel. How much it saves: bench/RESULTS.md, "Member rewrites".
"""
from typing import Optional

import torch

# The kernel's multiply-adds (padding included) over the matrices' above which a member
# keeps torch's GEMMs (`drt_fast.fuse.DenseMember`; bench/RESULTS.md, "Member rewrites").
CHAIN_MAX_WASTE = 1.25
_CHUNK = 32            # columns: block widths are padded to a multiple (kernels.h kDenseChunk)
_ALIGN = 16            # floats: each weight block and bias starts at a multiple (64 bytes)
_BLOCK_OVERHEAD = 4    # a block's fixed cost per row and column, in multiply-adds: it keeps
                       # blocks from splitting for a few zeros (fitted on the digits CNN)
_MAX_GROUPS = 1024     # column groups merged pairwise above that would cost seconds: one block


def chain_layers(plan) -> Optional[list]:
    """``[(W [n_in, n_out], b, relu)]`` when ``plan`` is float32 matrices each followed by at
    most one ReLU (what the CPU kernel runs), else None."""
    layers = []
    for kind, value in plan:
        if kind == "matrix":
            weight, bias = value
            if weight.dtype != torch.float32 or bias.dtype != torch.float32:
                return None
            layers.append([weight, bias, False])
        elif kind == "relu" and layers and not layers[-1][2]:
            layers[-1][2] = True
        else:
            return None
    return [tuple(layer) for layer in layers] or None


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def column_groups(weight: torch.Tensor) -> list:
    """Columns of ``weight`` ``[n_in, n_out]`` grouped into blocks ``(lo, hi, columns)``:
    each block reads input rows ``[lo, hi)``, which hold all the nonzeros of its columns.
    Columns with the same band start as one group; adjacent groups (ordered by band) are
    merged while that lowers ``(hi - lo + overhead) * padded width`` summed over blocks."""
    nonzero = weight != 0
    n_in, n_out = weight.shape
    any_row = nonzero.any(0)
    lo = torch.where(any_row, nonzero.int().argmax(0), 0).tolist()
    hi = torch.where(any_row, n_in - nonzero.flip(0).int().argmax(0), 0).tolist()
    bands: dict = {}
    for j in range(n_out):
        bands.setdefault((lo[j], hi[j]), []).append(j)
    if len(bands) > _MAX_GROUPS:
        return [(min(lo), max(hi), list(range(n_out)))]
    groups = [(a, b, cols) for (a, b), cols in sorted(bands.items())]

    def cost(lo, hi, n):
        return (hi - lo + _BLOCK_OVERHEAD) * _pad(n, _CHUNK)

    def band(g, h):
        if g[1] == g[0]:        # an empty band (all-zero columns) fits anywhere
            return h[0], h[1]
        if h[1] == h[0]:
            return g[0], g[1]
        return min(g[0], h[0]), max(g[1], h[1])

    def gain(g, h):
        return cost(*g[:2], len(g[2])) + cost(*h[:2], len(h[2])) - cost(*band(g, h), len(g[2]) + len(h[2]))

    while len(groups) > 1:
        gains = [gain(g, h) for g, h in zip(groups, groups[1:])]
        best = max(range(len(gains)), key=gains.__getitem__)
        if gains[best] < 0:
            break
        g, h = groups[best], groups[best + 1]
        groups[best:best + 2] = [(*band(g, h), g[2] + h[2])]
    return groups


def chain_plan(layers) -> tuple:
    """The CPU kernel's ``(meta, params, macs)`` for ``layers`` ``[(W, b, relu)]`` (layout
    in csrc/kernels.h; ``macs``: its multiply-adds a row, the padding included). Each hidden
    layer's outputs are reordered block by block (the next matrix's rows follow) and padded
    with zero columns to whole chunks; the last layer keeps its order, so the output is its
    first ``n_out`` columns."""
    params, size = [], 0

    def put(t: torch.Tensor) -> int:
        nonlocal size
        offset = size
        flat = t.reshape(-1)
        params.append(flat)
        size += flat.numel()
        gap = _pad(size, _ALIGN) - size
        if gap:
            params.append(flat.new_zeros(gap))
            size += gap
        return offset

    in_cols = layers[0][0].shape[0]
    meta, macs = [len(layers), in_cols, layers[-1][0].shape[1], 0], 0
    position = torch.arange(in_cols)           # where each of the layer's inputs is
    src_width = in_cols
    for index, (weight, bias, relu) in enumerate(layers):
        placed = weight.new_zeros(src_width, weight.shape[1])
        placed[position] = weight
        n_out = weight.shape[1]
        if index == len(layers) - 1:
            groups = [(0, src_width, list(range(n_out)))]
            nonzero = (placed != 0).any(1).nonzero()
            if len(nonzero):
                groups = [(int(nonzero[0]), int(nonzero[-1]) + 1, list(range(n_out)))]
        else:
            groups = column_groups(placed)
        blocks, new_position, width = [], torch.empty(n_out, dtype=torch.long), 0
        for lo, hi, cols in groups:
            block_width = _pad(len(cols), _CHUNK)
            w = weight.new_zeros(hi - lo, block_width)
            w[:, :len(cols)] = placed[lo:hi, cols]
            new_position[cols] = torch.arange(width, width + len(cols))
            blocks.append((lo, hi, width, block_width, put(w)))
            width += block_width
            macs += (hi - lo) * block_width
        full_bias = bias.new_zeros(width)
        full_bias[new_position] = bias
        meta += [width, int(relu), put(full_bias), len(blocks)]
        for block in blocks:
            meta += list(block)
        meta[3] = max(meta[3], width)
        position, src_width = new_position, width
    return torch.tensor(meta, dtype=torch.int64), torch.cat(params).contiguous(), macs
