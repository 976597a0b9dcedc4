"""Per-channel input normalization as the first layer of every member (Cohen's layout).

Noise is added in pixel space ``[0, 1]``; the model normalizes inside, so smoothing
radii are in pixel units whatever the dataset's normalization is.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class NormalizeLayer(nn.Module):
    """``(x - means[c]) / sds[c]`` per channel.

    ``means``/``sds`` are buffers (they travel with ``.to()`` and live in the state dict
    as ``means`` and ``sds``). Cohen's NormalizeLayer kept them as plain attributes, so
    his checkpoints lack these keys; `drt_fast.checkpoint` fills them in on import.

    Input ``[B, C, H, W]`` pixels in [0, 1]; output the same shape, normalized.
    """

    def __init__(self, means: Sequence[float], sds: Sequence[float]):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float32).flatten()
        sds = torch.as_tensor(sds, dtype=torch.float32).flatten()
        if means.numel() == 0 or means.shape != sds.shape:
            raise ValueError(f"means and sds must be non-empty and of equal length, "
                             f"got {tuple(means.shape)} and {tuple(sds.shape)}")
        if not bool((sds > 0).all()):
            raise ValueError(f"sds must be positive, got {sds.tolist()}")
        # [C, 1, 1] so that they broadcast over [B, C, H, W].
        self.register_buffer("means", means.view(-1, 1, 1))
        self.register_buffer("sds", sds.view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Follow the input's dtype (bf16/fp16 certification) rather than promoting to fp32.
        return (x - self.means.to(x.dtype)) / self.sds.to(x.dtype)

    def extra_repr(self) -> str:
        return f"means={self.means.flatten().tolist()}, sds={self.sds.flatten().tolist()}"


def with_normalization(model: nn.Module, means: Sequence[float],
                       sds: Sequence[float]) -> nn.Sequential:
    """``nn.Sequential(NormalizeLayer(means, sds), model)``.

    State-dict keys are ``0.means``, ``0.sds`` and ``1.<model keys>``, the layout of
    Cohen et al.'s and the DRT code's checkpoints.
    """
    return nn.Sequential(NormalizeLayer(means, sds), model)
