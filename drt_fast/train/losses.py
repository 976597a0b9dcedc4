"""Training losses: Gaussian augmentation (Cohen), SmoothAdv (Salman) and the DRT terms.

The DRT regularizers follow ``docs/method.md`` exactly. With p_i = softmax(f_i(x_noisy)):

* correct_i = (argmax p_i == y) per sample;
* runner-up y_i2 = argmax over c != y of p_i[c]; margin m_i = p_i[y] - p_i[y_i2];
* g_i = d m_i / d x_noisy per sample, built with ``create_graph=True`` so GD trains;
* CM = mean of m_i over the (member, sample) entries with correct_i;
* GD = mean of ||g_i + g_j||_2 (``"l2"``, the paper) or ||g_i + g_j||_2^2 (``"sq"``, the
  public code) over the (pair i<j, sample) entries with correct_i and correct_j;
* a term with no eligible entry is 0, still attached to the graph so ``backward`` works.

Efficiency: one forward per member serves both the cross-entropy and the regularizers
(:func:`member_forward`), and one ``autograd.grad`` call gives every member's margin
gradients. Each member reads its own view of the input, so the gradient of
``sum_i sum_b m_i[b]`` with respect to member i's view is exactly g_i; and because samples
do not interact, the gradient of a sum over the batch is the per-sample gradient.

BatchNorm in train mode breaks that last point: batch statistics couple the samples, so
g_i[b] then also contains the (O(1/B)) effect of sample b on the others' margins through the
batch mean and variance. We accept this coupling, as the public DRT code does (it too takes
input gradients of train-mode forwards); it keeps one forward per member and BN statistics
updated once per step. Evaluation-time quantities (``diagnose``) use eval mode, where the
gradients are exactly per sample.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GD_NORMS = ("l2", "sq")


@contextlib.contextmanager
def eval_mode(members: Sequence[nn.Module]):
    """``members`` in eval mode inside the block, each back in its own mode after it."""
    modes = [f.training for f in members]
    try:
        for f in members:
            f.eval()
        yield
    finally:
        for f, mode in zip(members, modes):
            f.train(mode)


def margins(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax confidence margins and correctness of one member.

    Args:
        logits: [B, K] member logits.
        y: [B] int64 true labels.
    Returns:
        (m, correct): m [B] = p[y] - max_{c != y} p[c] (differentiable), correct [B] bool =
        (argmax logits == y).
    """
    p = torch.softmax(logits, dim=1)
    p_true = p.gather(1, y[:, None]).squeeze(1)
    is_true = F.one_hot(y, p.shape[1]).bool()
    # the runner-up is chosen without gradient; the margin then differentiates through it
    runner_up = p.detach().masked_fill(is_true, float("-inf")).argmax(dim=1)
    p_runner_up = p.gather(1, runner_up[:, None]).squeeze(1)
    correct = logits.detach().argmax(dim=1) == y
    return p_true - p_runner_up, correct


def member_forward(members: Sequence[nn.Module], x_noisy: torch.Tensor
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run every member on its own view of ``x_noisy``, ready for :func:`drt_terms_from_logits`.

    Args:
        members: M modules mapping [B, *S] inputs to [B, K] logits.
        x_noisy: [B, *S] noisy inputs. If it does not require grad, a detached leaf that
            does is used (the input gradients need one); otherwise gradients also flow back
            into ``x_noisy`` (gradcheck, attacks).
    Returns:
        (views, logits): M input views [B, *S] and M logits [B, K].
    """
    base = x_noisy if x_noisy.requires_grad else x_noisy.detach().requires_grad_(True)
    # a separate view per member gives each member's input gradient its own slot in one
    # autograd.grad call, while sharing the storage of x_noisy
    views = [base.view_as(base) for _ in members]
    logits = [f(v) for f, v in zip(members, views)]
    return views, logits


def _masked_mean(values: list[torch.Tensor], masks: list[torch.Tensor],
                 anchor: torch.Tensor) -> torch.Tensor:
    """Mean of the entries of ``values`` selected by ``masks``; 0 on ``anchor``'s graph if none."""
    selected = [v[mk] for v, mk in zip(values, masks)]
    count = sum(int(s.numel()) for s in selected)
    if count == 0:
        return anchor.sum() * 0.0
    return torch.cat(selected).sum() / count


def drt_terms_from_logits(views: Sequence[torch.Tensor], logits: Sequence[torch.Tensor],
                          y: torch.Tensor, gd_norm: str = "l2", compute_gd: bool = True
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """GD and CM from the output of :func:`member_forward` (see the module docstring).

    Args:
        views, logits: as returned by :func:`member_forward` (M each).
        y: [B] int64 labels.
        gd_norm: ``"l2"`` (||g_i+g_j||) or ``"sq"`` (||g_i+g_j||^2).
        compute_gd: False skips the input gradients (GD returned as 0), for rho1 = 0.
    Returns:
        (gd, cm): scalar tensors, differentiable with respect to the members' parameters.
    """
    if gd_norm not in GD_NORMS:
        raise ValueError(f"gd_norm must be one of {GD_NORMS}, got {gd_norm!r}")
    results = [margins(z, y) for z in logits]
    m = [r[0] for r in results]
    correct = [r[1] for r in results]
    anchor = torch.stack([z.sum() for z in logits]).sum()
    cm = _masked_mean(m, correct, anchor)
    if not compute_gd or len(views) < 2:
        return anchor * 0.0, cm

    # one backward pass for all members: member i's margins depend only on views[i]
    total = torch.stack([mi.sum() for mi in m]).sum()
    grads = torch.autograd.grad(total, list(views), create_graph=True)
    g = [gi.flatten(1) for gi in grads]                     # M x [B, D]
    pair_values, pair_masks = [], []
    for i, j in itertools.combinations(range(len(g)), 2):
        sq = ((g[i] + g[j]) ** 2).sum(dim=1)               # [B]
        # sqrt of an exactly-zero norm has an infinite derivative; the clamp keeps it finite
        pair_values.append(sq if gd_norm == "sq" else sq.clamp_min(1e-24).sqrt())
        pair_masks.append(correct[i] & correct[j])
    gd = _masked_mean(pair_values, pair_masks, anchor)
    return gd, cm


def drt_terms(members: Sequence[nn.Module], x_noisy: torch.Tensor, y: torch.Tensor,
              gd_norm: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """The DRT regularizers GD (gradient diversity) and CM (confidence margin).

    Args:
        members: M modules mapping [B, *S] (noisy inputs, pixel space) to [B, K] logits.
        x_noisy: [B, *S] noisy inputs x + eps (all members see the same ones).
        y: [B] int64 labels.
        gd_norm: ``"l2"`` (paper, default) or ``"sq"`` (public code).
    Returns:
        (gd, cm): scalars; the DRT loss is sum_i CE_i + rho1 * gd - rho2 * cm.
    """
    views, logits = member_forward(members, x_noisy)
    return drt_terms_from_logits(views, logits, y, gd_norm)


def gaussian_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cohen's Gaussian data augmentation: CE of ``model`` on x + N(0, sigma^2 I).

    Args:
        x: [B, *S] clean inputs (pixel space); y: [B] labels.
    Returns:
        (loss, logits): mean cross-entropy (scalar) and the logits [B, K].
    """
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    logits = model(x + sigma * noise)
    return F.cross_entropy(logits, y), logits
