"""Diagnostics of an ensemble on noisy inputs: the quantities DRT's theory is about.

For inputs x of a dataset and noise draws x + eps (eps ~ N(0, sigma^2 I)), with every member in
eval mode (so input gradients are exactly per sample):

* per member pair (i, j): the mean over (input, draw) of cos(g_i, g_j), g_i = d m_i / d x the
  gradient of member i's confidence margin m_i = p_i[y] - max_{c != y} p_i[c]
  (DRT drives it down: diverse gradients);
* per member: mean margin m_i (signed; negative where the member is wrong) and accuracy on the
  noisy inputs (DRT drives margins up);
* the ensemble (WE: mean of member softmax) margin and accuracy on the same noisy inputs.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .losses import eval_mode, margins, member_forward


@dataclass
class Diagnosis:
    """Means over (input, noise draw). ``pair_cosine[(i, j)]`` for i < j."""

    member_margin: list[float]
    member_accuracy: list[float]
    pair_cosine: dict[tuple[int, int], float]
    ensemble_margin: float
    ensemble_accuracy: float
    num_samples: int

    @property
    def mean_cosine(self) -> float:
        """Mean of the pairwise cosines (nan for a single member)."""
        v = list(self.pair_cosine.values())
        return sum(v) / len(v) if v else float("nan")

    @property
    def mean_margin(self) -> float:
        return sum(self.member_margin) / len(self.member_margin)

    @property
    def finite(self) -> bool:
        """False where a member gave NaN/inf logits or input gradients on some draw."""
        values = [*self.member_margin, *self.pair_cosine.values(), self.ensemble_margin]
        return all(math.isfinite(v) for v in values)


def diagnose(members: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, sigma: float,
             noise_draws: int = 4, seed: int = 0, batch: int = 500) -> Diagnosis:
    """Compute the :class:`Diagnosis` of ``members`` on x [N, *S] (pixels), y [N] at noise ``sigma``.

    Each input gets ``noise_draws`` noise vectors from a generator seeded by ``seed``. The
    members are put in eval mode and restored afterwards; their parameters get no gradient.
    """
    M = len(members)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sums = {"margin": torch.zeros(M, dtype=torch.float64), "acc": torch.zeros(M, dtype=torch.float64),
            "cos": {p: 0.0 for p in itertools.combinations(range(M), 2)},
            "ens_margin": 0.0, "ens_acc": 0.0}
    count = 0
    with eval_mode(members):
        for _ in range(noise_draws):
            for s in range(0, len(x), batch):
                xb, yb = x[s:s + batch], y[s:s + batch]
                noisy = xb + sigma * torch.randn(xb.shape, generator=gen, device=x.device, dtype=xb.dtype)
                views, logits = member_forward(members, noisy)
                results = [margins(z, yb) for z in logits]
                total = torch.stack([m.sum() for m, _ in results]).sum()
                # only the input gradients are wanted, not the parameters'
                grads = [g.flatten(1) for g in torch.autograd.grad(total, views)]
                for i, (m, ok) in enumerate(results):
                    sums["margin"][i] += float(m.detach().double().sum())
                    sums["acc"][i] += float(ok.double().sum())
                for i, j in sums["cos"]:
                    sums["cos"][(i, j)] += float(F.cosine_similarity(grads[i], grads[j], dim=1).double().sum())
                with torch.no_grad():
                    p = torch.stack([torch.softmax(z.detach().float(), 1) for z in logits]).mean(0)
                    m_ens, ok_ens = margins(p.log(), yb)
                sums["ens_margin"] += float(m_ens.double().sum())
                sums["ens_acc"] += float(ok_ens.double().sum())
                count += len(yb)
    n = max(1, count)
    return Diagnosis(member_margin=(sums["margin"] / n).tolist(),
                     member_accuracy=(sums["acc"] / n).tolist(),
                     pair_cosine={k: v / n for k, v in sums["cos"].items()},
                     ensemble_margin=sums["ens_margin"] / n,
                     ensemble_accuracy=sums["ens_acc"] / n, num_samples=count)


def format_table(d: Diagnosis) -> str:
    """The diagnosis as plain-text tables (members, pairs, ensemble)."""
    lines = [f"noisy samples: {d.num_samples}", "",
             "member  margin   accuracy"]
    for i, (m, a) in enumerate(zip(d.member_margin, d.member_accuracy)):
        lines.append(f"{i:>6}  {m:7.4f}  {a:8.4f}")
    lines.append(f"{'mean':>6}  {d.mean_margin:7.4f}  {sum(d.member_accuracy) / len(d.member_accuracy):8.4f}")
    if d.pair_cosine:
        lines += ["", "pair    gradient cosine"]
        for (i, j), c in d.pair_cosine.items():
            lines.append(f"{i},{j:<5}  {c:8.4f}")
        lines.append(f"{'mean':<6}  {d.mean_cosine:8.4f}")
    lines += ["", "ensemble (WE)  margin   accuracy",
              f"{'':>13}  {d.ensemble_margin:7.4f}  {d.ensemble_accuracy:8.4f}"]
    return "\n".join(lines)
