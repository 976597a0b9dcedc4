"""Inference rewrites of a member network for certification.

Certification runs every member forward hundreds of thousands of times per input in eval
mode, where a BatchNorm is a fixed per-channel affine map. Each rewrite returns an
`InferenceMember`: a rewritten copy of the member (the member is never changed), or the
member itself with the reason nothing was rewritten. The engine checks a rewritten copy
against the member before it trusts it; the copy computes the member's function up to
floating-point rounding, and a certificate is one of the network that is evaluated.

* `conv` -- `for_inference`: BatchNorms folded, conv(+add)+ReLU as one fused call (cuDNN's
  on CUDA, oneDNN's on the CPU, plain torch for tests);
* `dense` -- `dense_for_inference`: the CPU's, a chain of affine layers and activations as
  dense matrices (`lowering` reads the chain, `planner` lays it out for the block-sparse
  CPU kernel);
* `cifar_resnet` -- `cifar_resnet_for_inference`: a CIFAR ResNet as one call of drt-fast's
  whole-network CUDA kernel (experimental, asked for by ``DRT_FAST_CIFAR_RESNET``).

Measured effects of each: bench/RESULTS.md, "Member rewrites".
"""
from .cifar_resnet import (CIFAR_RESNET_ENV, CIFAR_RESNET_ENV_ALIAS, CifarResNetMember, cifar_resnet_for_inference,
                           cifar_resnet_parts, cifar_resnet_setting, cifar_resnet_variant, fold_conv_bn)
from .common import InferenceMember, NotLowered
from .conv import FusedConvReLU, FusedOps, cudnn_ops, for_inference, onednn_available, onednn_ops, reference_ops
from .dense import DENSE_MAX_PARAMETERS, DenseMember, dense_for_inference
from .lowering import DENSE_MAX_ENTRIES, DENSE_MAX_WASTE
from .planner import CHAIN_MAX_WASTE, chain_layers, chain_plan, column_groups

__all__ = [
    "InferenceMember", "NotLowered",
    "FusedOps", "FusedConvReLU", "for_inference", "reference_ops", "cudnn_ops", "onednn_ops", "onednn_available",
    "DenseMember", "dense_for_inference", "DENSE_MAX_ENTRIES", "DENSE_MAX_WASTE", "DENSE_MAX_PARAMETERS",
    "CHAIN_MAX_WASTE", "chain_layers", "chain_plan", "column_groups",
    "CifarResNetMember", "cifar_resnet_for_inference", "cifar_resnet_variant", "cifar_resnet_setting",
    "cifar_resnet_parts", "fold_conv_bn", "CIFAR_RESNET_ENV", "CIFAR_RESNET_ENV_ALIAS",
]
