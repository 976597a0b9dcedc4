"""SmoothAdv: PGD on the smoothed soft classifier (Salman et al., NeurIPS 2019).

The attacked function is the soft smoothed classifier estimated with m fixed noise draws,
G(x)_c = (1/m) sum_j softmax(f(x + eps_j))_c; PGD takes ``steps`` L2-normalized ascent steps
of -log G(x')_y of size 2 * eps / steps, projecting x' onto the L2 ball of radius ``eps``
around x and onto the pixel box [0, 1] (Salman et al.'s PGD_L2, "SmoothAdv_PGD").
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def smoothed_soft_log_prob(models: Sequence[nn.Module], x_rep: torch.Tensor,
                           noise: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
    """log G(x)_y for each input, averaging softmax over m noise draws and over ``models``.

    Args:
        models: one member (SmoothAdv) or all members (DRT-SmoothAdv: attack the ensemble).
        x_rep: [B*m, *S] each input repeated m times (row b*m + j is input b).
        noise: [B*m, *S] the noise sigma * eps_j, fixed across PGD steps.
        y: [B] labels.
    Returns:
        [B] log of the averaged probability of the true class (clamped away from 0).
    """
    probs = torch.stack([torch.softmax(f(x_rep + noise), dim=1) for f in models]).mean(0)
    avg = probs.view(-1, m, probs.shape[1]).mean(1)                 # [B, K]
    return avg.gather(1, y[:, None]).squeeze(1).clamp_min(1e-20).log()


def pgd_smoothed(models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor,
                 noise: torch.Tensor, m: int, eps: float, steps: int) -> torch.Tensor:
    """Adversarial points x' (||x' - x||_2 <= eps, x' in [0,1]) against the smoothed soft classifier.

    Args:
        x: [B, *S] clean inputs in [0, 1]; y: [B] labels.
        noise: [B*m, *S] fixed noise (already scaled by sigma), rows grouped per input.
        m, eps, steps: noise draws per input, L2 radius (pixels), PGD steps.
    Returns:
        [B, *S] adversarial inputs, detached. The models' train/eval mode is left as it was;
        callers put them in eval mode (Salman et al. attack the eval-mode model).
    """
    if eps <= 0 or steps < 1:
        return x.detach()
    x = x.detach()
    step_size = 2.0 * eps / steps
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        x_rep = (x + delta).repeat_interleave(m, dim=0)
        loss = -smoothed_soft_log_prob(models, x_rep, noise, y, m).sum()
        # autograd.grad with respect to delta only: the parameters' .grad stay untouched
        (grad,) = torch.autograd.grad(loss, [delta])
        norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        # a zero gradient has no direction: stay put rather than divide by zero
        direction = torch.where(norms > 0, grad / norms.clamp_min(1e-12), torch.zeros_like(grad))
        with torch.no_grad():
            delta += step_size * direction
            delta.copy_((x + delta).clamp(0, 1) - x)                 # pixel box
            delta.copy_(delta.flatten(1).renorm(2, 0, eps).view_as(delta))  # L2 ball
    return (x + delta).detach()
