"""Dense lowering (the CPU's member rewrite): a member that is a chain of affine layers and
elementwise activations, on inputs small enough, becomes a chain of ``h @ W + b`` and
activations on flat rows (`DenseMember`): each run of affine layers between two activations
is one dense matrix (`drt_fast.fuse.lowering`). On small inputs the matrices are small, and
one GEMM beats a few tiny convolutions; in float32 on the CPU a chain of matrices and ReLUs
runs as one call of the block-sparse kernel (`drt_fast.ops.dense_chain`, planned by
`drt_fast.fuse.planner`). Measured speed-ups: bench/RESULTS.md, "Member rewrites".

The matrices are computed in float64 and stored in float32: the member's function up to
rounding. Members of more than `DENSE_MAX_PARAMETERS` parameters are refused before they are
copied.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .. import ops
from ..errors import first_line
from .common import InferenceMember, NotLowered, copy_and_trace, node_shape, propagate
from .lowering import LeafTracer, layer_chain, lower_runs, matrix_runs
from .planner import CHAIN_MAX_WASTE, chain_layers, chain_plan

DENSE_MAX_PARAMETERS = 2**22  # bigger members are refused before they are copied


class DenseMember(nn.Module):
    """A member lowered to a chain of ``h @ W + b`` and elementwise activations on flat rows.

    Input ``[B, *S]`` (any layout: it is read in C order), output ``[B, *out_shape]``. The
    matrices are buffers ``weight{i}`` ``[n_in, n_out]`` and ``bias{i}`` ``[n_out]``. A
    chain of float32 matrices each followed by at most a ReLU, built on the CPU, also keeps
    the block-sparse kernel's plan (``chain_meta``, ``chain_params``; `chained`), which its
    float32 CPU forward runs; other dtypes, autocast and other devices use the matrices.
    """

    def __init__(self, plan, out_shape):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.acts = nn.ModuleList()
        self._steps = []          # ("matrix", i) | ("relu", None) | ("act", callable)
        for kind, value in plan:
            if kind == "matrix":
                i = sum(k == "matrix" for k, _ in self._steps)
                self.register_buffer(f"weight{i}", value[0].contiguous())
                self.register_buffer(f"bias{i}", value[1].contiguous())
                self._steps.append(("matrix", i))
            elif isinstance(value, nn.Module):
                self.acts.append(value)
                self._steps.append(("act", value))
            else:
                self._steps.append((kind, value))
        # The CPU's float32 forward: the whole chain in one kernel (`ops.dense_chain_cpu`),
        # where the chain is matrices each followed by at most a ReLU.
        # Not where padding to whole chunks costs more than the zeros save (a single 784 x 10
        # matrix would do 3.2x the multiply-adds of torch.mm's GEMM).
        chain = chain_layers(plan)
        if chain is not None and chain[0][0].device.type == "cpu":
            meta, params, macs = chain_plan(chain)
            stats = (sum(w.numel() for w, _, _ in chain), macs)
            if stats[1] <= CHAIN_MAX_WASTE * stats[0]:
                self.register_buffer("chain_meta", meta, persistent=False)
                self.register_buffer("chain_params", params, persistent=False)
                self.chain_out = chain[-1][0].shape[1]
                self.chain_stats = stats

    @property
    def chained(self) -> bool:
        """Whether the CPU's float32 forward runs as one `ops.dense_chain_cpu` call."""
        return "chain_meta" in self._buffers

    @property
    def matrices(self) -> int:
        return sum(kind == "matrix" for kind, _ in self._steps)

    def plan(self) -> list:
        """The plan this member runs, as it was built: ``("matrix", (W, b))``, ``("relu",
        None)`` and ``("act", callable)`` steps (W, b: the buffers themselves)."""
        steps = []
        for kind, value in self._steps:
            if kind == "matrix":
                value = (getattr(self, f"weight{value}"), getattr(self, f"bias{value}"))
            steps.append((kind, value))
        return steps

    def forward(self, x):
        h = x.reshape(x.shape[0], -1)
        # float32 on the CPU: the whole chain in one kernel (`ops.dense_chain_cpu`), or per
        # matrix a GEMM, then bias (+ ReLU) in one pass (`ops.bias_act_cpu_`); elsewhere, and
        # under autocast, addmm (+ ReLU) as torch runs it.
        epilogue = (h.device.type == "cpu" and h.dtype == torch.float32
                    and not torch.is_autocast_enabled("cpu"))
        if epilogue and self.chained:
            out = ops.dense_chain_cpu(h, self.chain_meta, self.chain_params, self.chain_out)
            if out is not None:
                return out.reshape(x.shape[0], *self.out_shape)
        owned = False            # h is ours to overwrite (not the caller's input)
        buffers, plan, i = self._buffers, self._steps, 0
        while i < len(plan):
            kind, value = plan[i]
            i += 1
            if kind == "matrix":
                weight, bias = buffers[f"weight{value}"], buffers[f"bias{value}"]
                relu = epilogue and i < len(plan) and plan[i][0] == "relu"
                if epilogue:
                    h = torch.mm(h, weight)
                    if not ops.bias_act_cpu_(h, bias, relu):
                        ops.reference_bias_act_(h, bias, relu)
                    i += relu                    # the ReLU is done
                else:
                    h = torch.addmm(bias, h, weight)
                owned = True
                continue
            if not owned:
                h, owned = h.clone(), True
            h = h.relu_() if kind == "relu" else value(h)
        return h.reshape(x.shape[0], *self.out_shape)

    def extra_repr(self) -> str:
        shapes = [tuple(getattr(self, f"weight{v}").shape) for k, v in self._steps if k == "matrix"]
        chain = ""
        if self.chained:
            dense, blocked = self.chain_stats
            chain = f", cpu kernel: {blocked:,} of {dense:,} multiply-adds a row"
        return f"matrices={shapes}, out_shape={self.out_shape}{chain}"


def dense_for_inference(member: nn.Module, example: torch.Tensor) -> InferenceMember:
    """``member`` as a `DenseMember` (``InferenceMember.dense``: its number of matrices), or
    the member itself with the reason when it is not a chain of affine layers and
    elementwise activations, or a matrix would cost too much (`drt_fast.fuse.lowering`).

    ``example``: an input batch (its first row is used). The matrices are computed in
    float64 from the member's own layers (the layers applied to the unit vectors) and
    stored in the member's dtype.
    """
    params = sum(t.numel() for t in member.parameters())
    if params > DENSE_MAX_PARAMETERS:      # no copy of a big network just to refuse it
        return InferenceMember(member, reason=f"it has {params:,} parameters, too many for "
                                              f"dense matrices (limit {DENSE_MAX_PARAMETERS:,})")
    _, gm, reason = copy_and_trace(member, lambda m: fx.GraphModule(m, LeafTracer().trace(m)))
    if gm is None:
        return InferenceMember(member, reason=reason)
    dtype = next((t.dtype for t in gm.parameters() if t.is_floating_point()), torch.float32)
    pair = example[:1].expand(2, *example.shape[1:]).to(dtype).contiguous()
    try:
        propagate(gm, pair)
        chain = layer_chain(gm)
        runs = matrix_runs(gm, chain)
        if not any(kind == "matrix" for kind, _ in runs):
            return InferenceMember(member, reason="it has no layer to turn into a matrix")
        plan = lower_runs(gm, runs, pair, dtype)
    except NotLowered as err:
        return InferenceMember(member, reason=str(err))
    except Exception as err:  # noqa: BLE001 -- a member this does not understand runs as it is
        return InferenceMember(member, reason=f"it could not be lowered: {first_line(err)}")
    out = DenseMember(plan, node_shape(chain[-1][1])[1:])
    return InferenceMember(out, dense=out.matrices)
