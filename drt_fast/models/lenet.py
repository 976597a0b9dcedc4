"""LeNet for MNIST as in the DRT paper's public code (inherited from Jeong & Shin's
smoothing-consistency code): module names ``conv1, conv2, fc1, fc2`` so that its
checkpoints load unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    """conv 1->20 5x5 -> ReLU -> maxpool 2 -> conv 20->50 5x5 -> ReLU -> maxpool 2
    -> fc 800->500 -> ReLU -> fc 500->K.

    Input ``[B, 1, 28, 28]``, output logits ``[B, num_classes]``.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)   # [B, 20, 12, 12]
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)   # [B, 50, 4, 4]
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
