"""One optimization step's loss, per trainer kind (see `drt_fast.train.trainer`):

* ``gaussian`` / ``smoothadv`` — each member on its own noise (and its own PGD point);
* ``drt`` / ``drt-smoothadv`` — every member on the same m noisy copies (at the smoothed
  ensemble's PGD point), plus rho1 * GD - rho2 * CM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .losses import drt_terms_from_logits, gaussian_loss, member_forward
from .smoothadv import pgd_smoothed


@dataclass
class _Batch:
    """A step's inputs ``x [B, *S]`` and labels ``y [B]``, each repeated m times (``x_rep``
    ``[B*m, *S]``, ``y_rep`` ``[B*m]``), and the generator of its noise."""

    x: torch.Tensor
    y: torch.Tensor
    x_rep: torch.Tensor
    y_rep: torch.Tensor
    sigma: float
    gen: torch.Generator

    def noise(self) -> torch.Tensor:
        """sigma * N(0, I) of ``x_rep``'s shape: the next draw of the step's generator."""
        return self.sigma * torch.randn(self.x_rep.shape, generator=self.gen,
                                        device=self.x.device, dtype=self.x.dtype)


class Step:
    """One optimization step's loss for the configured trainer.

    ``step(x [B, *S], y [B], gen, autocast) -> (loss, stats)``: ``loss`` the scalar to
    backpropagate (the sum over members), ``stats`` host floats ``gd``, ``cm`` (None where
    this trainer or these weights do not compute them), ``ce`` (mean over members) and
    ``acc`` (on the noisy copies). ``eps`` is the SmoothAdv radius of the current epoch
    (`config.eps_at`); the members are put in eval mode for the attack only.
    """

    def __init__(self, config: TrainConfig, members: list[nn.Module]):
        self.c = config
        self.members = members
        self.eps = config.eps  # SmoothAdv radius of the current epoch (eps_at)

    def _set_train(self, mode: bool) -> None:
        for f in self.members:
            f.train(mode)

    def __call__(self, x, y, gen, autocast):
        m = self.c.m
        batch = _Batch(x, y, x.repeat_interleave(m, dim=0), y.repeat_interleave(m),
                       self.c.sigma, gen)
        if self.c.trainer in ("gaussian", "smoothadv"):
            return self._own_noise(batch, autocast)
        return self._shared_noise(batch, autocast)

    def _own_noise(self, b: _Batch, autocast):
        """Gaussian (Cohen) or SmoothAdv (Salman): sum_i CE(f_i(x_i + eps_i), y), each member
        with its own noise (and, for SmoothAdv, its own PGD point x_i)."""
        c, M = self.c, len(self.members)
        stats = {"gd": None, "cm": None}     # None: not computed by this trainer
        ce_total, correct = 0.0, 0
        loss = 0.0
        for f in self.members:
            if c.trainer == "smoothadv":
                eps_i = b.noise()
                self._set_train(False)
                x_adv = pgd_smoothed([f], b.x, b.y, eps_i, c.m, self.eps, c.steps)
                self._set_train(True)
                with autocast():
                    logits = f(x_adv.repeat_interleave(c.m, dim=0) + eps_i)
                    ce = F.cross_entropy(logits.float(), b.y_rep)
            else:
                with autocast():
                    ce, logits = gaussian_loss(f, b.x_rep, b.y_rep, c.sigma, b.gen)
            loss = loss + ce
            ce_total += ce.item()
            correct += int((logits.argmax(1) == b.y_rep).sum())
        stats.update(ce=ce_total / M, acc=correct / (M * len(b.y_rep)))
        return loss, stats

    def _shared_noise(self, b: _Batch, autocast):
        """DRT: sum_i CE(f_i(x + eps), y) + rho1 * GD - rho2 * CM, the same noisy copies for
        every member (at the smoothed ensemble's PGD point for DRT-SmoothAdv)."""
        c, M = self.c, len(self.members)
        stats = {"gd": None, "cm": None}     # None: not computed with these weights
        eps = b.noise()
        if c.trainer == "drt-smoothadv":
            self._set_train(False)
            x_adv = pgd_smoothed(self.members, b.x, b.y, eps, c.m, self.eps, c.steps)
            self._set_train(True)
            x_noisy = x_adv.repeat_interleave(c.m, dim=0) + eps
        else:
            x_noisy = b.x_rep + eps
        with autocast():
            views, logits = member_forward(self.members, x_noisy)
            logits = [z.float() for z in logits]
            ces = [F.cross_entropy(z, b.y_rep) for z in logits]
            need_terms = c.rho1 > 0 or c.rho2 > 0
            if need_terms:
                gd, cm = drt_terms_from_logits(views, logits, b.y_rep, c.gd_norm,
                                               compute_gd=c.rho1 > 0)
            loss = torch.stack(ces).sum()
            if need_terms:
                loss = loss + c.rho1 * gd - c.rho2 * cm
                stats.update(gd=gd.item() if c.rho1 > 0 else None, cm=cm.item())
        correct = sum(int((z.argmax(1) == b.y_rep).sum()) for z in logits)
        stats.update(ce=float(torch.stack(ces).detach().mean()), acc=correct / (M * len(b.y_rep)))
        return loss, stats
