"""A small CNN for scikit-learn's 8x8 digits: the members of the embedded default.

It is sized for CPU certification: ``drt-fast certify --n 100000`` with three members
out of the box needs a few hundred thousand member forwards per second on two cores.
Both convolutions are strided: full-resolution ones cost far more CPU time for the same
number of multiply-adds (figures in bench/RESULTS.md, "Training inputs and the digits CNN").
"""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv 1->16 4x4 stride 2 (8x8 -> 4x4) -> ReLU -> conv 16->32 3x3 stride 2
    (4x4 -> 2x2) -> ReLU -> fc 128->K.

    About 24 k multiply-adds per input (4.1 k + 18.4 k + 1.3 k). Input ``[B, 1, 8, 8]``
    (normalized), output logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, kernel_size=4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * width * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(x.flatten(1))
