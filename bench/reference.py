"""The baseline of every end-to-end benchmark: Cohen et al.'s ``core.py`` loop, written out.

This is the plain loop of locuslab/smoothing ``code/core.py`` (``Smooth._sample_noise``),
extended to an ensemble the obvious way, with nothing fused and nothing clever:

    for each batch:
        batch = x.repeat((this_batch_size, 1, 1, 1))
        noise = torch.randn_like(batch) * sigma
        logits = [member(batch + noise) for member in members]   # every member, same noise
        labels = aggregate(logits)                                # we / logit / mme / mv
        counts += bincount(labels.cpu().numpy())                  # host sync every batch

Selection (n0 draws) and estimation (n draws) are two separate calls, as in Cohen's
``certify``; the statistics are his (one-sided Clopper-Pearson at level alpha, abstain
below 1/2, radius sigma * Phi^-1(pA_lower)). The aggregation rules are drt-fast's
(``drt_fast.ensemble``), in plain fp32 torch; ties go to the smaller index (torch.argmax).
Cohen counts with a Python loop over the labels; numpy's bincount is used here, which only
makes the baseline faster.
"""
import math

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

ABSTAIN = -1


def members_of(model):
    """(members, mode, weights [M] fp32) of a drt_fast.Ensemble, or of a bare nn.Module."""
    if hasattr(model, "members") and hasattr(model, "mode"):
        return list(model.members), model.mode, model.weights.detach().float()
    if isinstance(model, nn.Module):
        return [model], "we", torch.ones(1)
    raise TypeError(f"expected an nn.Module or a drt_fast.Ensemble, got {type(model).__name__}")


def aggregate(logits, mode, weights):
    """Stacked member logits ``[M, R, K]`` -> labels ``[R]`` (int64), plain fp32 torch."""
    logits = logits.float()
    w = weights.to(logits.device)[:, None, None]
    if mode == "we":
        score = (w * logits.softmax(-1)).sum(0)
    elif mode == "logit":
        score = (w * logits).sum(0)
    elif mode == "mme":
        top2 = logits.softmax(-1).topk(2, dim=-1).values                    # [M, R, 2]
        decider = (top2[..., 0] - top2[..., 1]).argmax(0)                   # [R]
        score = logits[decider, torch.arange(logits.shape[1], device=logits.device)]
    elif mode == "mv":
        one_hot = nn.functional.one_hot(logits.argmax(-1), logits.shape[-1])  # [M, R, K]
        score = (w.double() * one_hot).sum(0)   # float64 as drt-fast: exact weight ties tie
    else:
        raise ValueError(f"unknown ensemble mode {mode!r}")
    return score.argmax(-1)


class ReferenceSmooth:
    """Cohen's ``Smooth`` for an ensemble: ``predict``, ``certify`` and ``_sample_noise``."""

    def __init__(self, model, num_classes, sigma):
        self.members, self.mode, self.weights = members_of(model)
        for member in self.members:
            member.eval()
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x, n0, n, alpha, batch_size):
        """x: one input ``[C, H, W]`` (pixels) -> (label or -1, radius)."""
        counts_selection = self._sample_noise(x, n0, batch_size)
        cAHat = int(counts_selection.argmax())
        counts_estimation = self._sample_noise(x, n, batch_size)
        nA = int(counts_estimation[cAHat])
        pABar = lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return ABSTAIN, 0.0
        return cAHat, float(self.sigma * norm.ppf(pABar))

    def predict(self, x, n, alpha, batch_size):
        """x: one input ``[C, H, W]`` -> the top class, or -1 (two-sided binomial test)."""
        counts = self._sample_noise(x, n, batch_size)
        top2 = counts.argsort()[::-1][:2]
        count1, count2 = int(counts[top2[0]]), int(counts[top2[1]])
        if binomtest(count1, count1 + count2, p=0.5).pvalue > alpha:
            return ABSTAIN
        return int(top2[0])

    def _sample_noise(self, x, num, batch_size):
        """Class counts ``[K]`` (numpy int64) of ``num`` noisy draws of x."""
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=np.int64)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size,) + (1,) * x.dim())
                noise = torch.randn_like(batch) * self.sigma
                noisy = batch + noise
                logits = torch.stack([member(noisy) for member in self.members])
                predictions = aggregate(logits, self.mode, self.weights)
                counts += np.bincount(predictions.cpu().numpy(), minlength=self.num_classes)
            return counts


def lower_confidence_bound(k, n, alpha):
    """Cohen's ``proportion_confint(k, n, alpha=2*alpha, method="beta")[0]``."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def reference_certify(ensemble, x, n0, n, alpha, batch_size, *, sigma, num_classes):
    """Cohen's CERTIFY of one input x ``[C, H, W]`` -> (label or -1, radius)."""
    return ReferenceSmooth(ensemble, num_classes, sigma).certify(x, n0, n, alpha, batch_size)


def reference_predict(ensemble, x, n, alpha, batch_size, *, sigma, num_classes):
    """Cohen's PREDICT of one input x ``[C, H, W]`` -> label or -1."""
    return ReferenceSmooth(ensemble, num_classes, sigma).predict(x, n, alpha, batch_size)

