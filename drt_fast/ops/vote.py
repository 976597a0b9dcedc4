"""``vote_``: per noise draw, aggregate the members' logits, take the argmax, count it.

The aggregation modes are `drt_fast.validate.AGGREGATIONS` (docs/DESIGN.md section 3); the
compiled kernels know each by its index there (`AGGREGATION_CODES`, csrc/kernels.h enum
Aggregation).
"""
import torch
from torch import Tensor

from .. import validate
from . import checks, extension, reference

AGGREGATION_CODES = {name: code for code, name in enumerate(validate.AGGREGATIONS)}


@torch.library.custom_op("drt_fast::vote_", mutates_args=("counts",))
def vote_(logits: Tensor, rows: Tensor, counts: Tensor, agg: str, weights: Tensor) -> None:
    """Per draw, aggregate the members and add one vote for the winning class, in place.

    Args:
        logits: ``[M, R, K]`` float32/bfloat16/float16, M members' logits on R noise draws.
        rows: ``[R]`` int64, the row of ``counts`` each draw votes in (its input).
        counts: ``[B, K]`` int64, contiguous, updated in place.
        agg: ``"we"`` weighted softmax average, ``"logit"`` weighted logit average,
            ``"mme"`` the member with the largest softmax top-1 minus top-2 margin decides,
            ``"mv"`` weighted majority vote of member argmaxes.
        weights: ``[M]`` float32 member weights.

    Ties go to the smaller class index (and, in ``mme``, the smaller member index). A draw with
    any non-finite logit casts no vote. On CUDA, ``rows`` is not range-checked and ``weights``
    not checked for NaN/inf (either would synchronize with the host): a draw whose row is out
    of range casts no vote there.
    """
    vote_eager_(logits, rows, counts, agg, weights)


def vote_eager_(logits: Tensor, rows: Tensor, counts: Tensor, agg: str, weights: Tensor) -> None:
    """`vote_` without the dispatcher (see `noisy_draws_eager`)."""
    checks.vote_args(logits, rows, counts, agg, weights)
    kernels = extension.kernels_for("vote_", logits)
    if kernels is None:
        reference.reference_vote_(logits, rows, counts, agg, weights)
        return
    members, draws, classes = logits.shape
    if draws == 0:
        return
    logits_c, rows_c, weights_c = logits.contiguous(), rows.contiguous(), weights.contiguous()
    args = (logits_c.data_ptr(), extension.DTYPE_CODES[logits.dtype], members, draws, classes, rows_c.data_ptr(),
            counts.data_ptr(), counts.shape[0], AGGREGATION_CODES[agg], weights_c.data_ptr())
    if logits.is_cuda:
        with torch.cuda.device(logits.device):
            kernels.vote(*args, *extension.cuda_launch(logits))
    else:
        checks.finite_weights(weights)
        bad_row = kernels.vote(*args)
        if bad_row >= 0:  # checked before any count changed
            checks.rows_in_range(rows, counts.shape[0])


@vote_.register_fake
def _(logits, rows, counts, agg, weights):
    checks.vote_args(logits, rows, counts, agg, weights)
