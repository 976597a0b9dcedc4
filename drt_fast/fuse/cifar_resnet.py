"""A CIFAR ResNet member as one call of drt-fast's whole-network CUDA kernel
(`drt_fast.ops.cifar_resnet`): `cifar_resnet_for_inference` builds a `CifarResNetMember`
from the exact module structure of `drt_fast.models.cifar_resnet.ResNet` with BasicBlocks,
and `cifar_resnet_variant` says whether bf16 certification on a device runs it.

The kernel is experimental and off by default: it runs only when the environment asks for
it (`CIFAR_RESNET_ENV`; docs/internals.md, "Engine", says where it stands).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..models.normalize import NormalizeLayer
from .common import InferenceMember, NotLowered

CIFAR_RESNET_ENV = "DRT_FAST_CIFAR_RESNET"
# The variable's former name, still read (after CIFAR_RESNET_ENV): users' scripts and
# bench/gpu-check.sh set it.
CIFAR_RESNET_ENV_ALIAS = "DRT_FAST_RESNET_KERNEL"
_VARIANTS = {"1": 1, "mma": 1, "wmma": 0}   # the variables' values that ask for the kernel


def _requested() -> tuple:
    """``(name, value)`` of the variable that asks for the kernel, or ``(None, None)``."""
    for name in (CIFAR_RESNET_ENV, CIFAR_RESNET_ENV_ALIAS):
        if name in os.environ:
            return name, os.environ[name]
    return None, None


def cifar_resnet_setting() -> str:
    """``NAME=value`` of the environment variable that asks for the kernel (`CIFAR_RESNET_ENV`,
    else `CIFAR_RESNET_ENV_ALIAS`), for status lines; "" when neither is set."""
    name, value = _requested()
    return "" if name is None else f"{name}={value}"


def cifar_resnet_variant(device: torch.device) -> Optional[int]:
    """The variant of the CIFAR ResNet kernel that bf16 certification on ``device`` runs
    CIFAR ResNet members with (`CifarResNetMember`), or None: only with
    ``DRT_FAST_CIFAR_RESNET`` (or its former name ``DRT_FAST_RESNET_KERNEL``) set to ``mma``
    (or ``1``: the mma.sync variant, 1) or ``wmma`` (variant 0), the CUDA kernels running on
    ``device`` (`ops.kernels_run_on`), and a GPU of compute capability 8.0 or newer with room
    for the kernel's shared memory (``cifar_resnet_sizes`` of the CUDA module)."""
    variant = _VARIANTS.get(_requested()[1])
    if variant is None or device.type != "cuda" or not ops.kernels_run_on(device):
        return None
    props = torch.cuda.get_device_properties(device)
    room = getattr(props, "shared_memory_per_block_optin", 0)
    needed = ops.extension.cuda_kernels.cifar_resnet_sizes(1, variant)[2]
    return variant if props.major >= 8 and room >= needed else None


class CifarResNetMember(nn.Module):
    """A CIFAR ResNet member (`drt_fast.models.cifar_resnet.ResNet` of BasicBlocks, depth
    6n+2, behind an optional `NormalizeLayer`) as one `ops.cifar_resnet` call: BatchNorms
    folded in float64, convolution weights stored as bf16 tiles, float32 logits ``[B, K]``
    from pixels ``[B, 3, 32, 32]``. It computes in bf16 whatever the input dtype (the
    kernel's arithmetic; `cifar_resnet_for_inference` builds it for bf16 certification only)."""

    def __init__(self, weights, biases, norm, fc_w, fc_b, blocks: int, variant: int):
        super().__init__()
        for name, t in (("weights", weights), ("biases", biases), ("norm", norm), ("fc_w", fc_w),
                        ("fc_b", fc_b)):
            self.register_buffer(name, t.contiguous())
        self.blocks, self.variant = blocks, variant

    def forward(self, x):
        return ops.cifar_resnet_eager(x, self.weights, self.biases, self.norm, self.fc_w, self.fc_b,
                                      self.blocks, self.variant)

    def extra_repr(self) -> str:
        return (f"depth={6 * self.blocks + 2}, classes={self.fc_w.shape[0]}, "
                f"{len(ops.cifar_resnet_convs(self.blocks))} convolutions as bf16 tiles, "
                f"{ops.CIFAR_RESNET_VARIANTS[self.variant]}")


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """``conv`` followed by eval-mode ``bn`` (with running statistics) as (weight, bias),
    folded in float64 (torch's `fuse_conv_bn_weights`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    def double(t):
        return None if t is None else t.detach().double()

    weight, bias = fuse_conv_bn_weights(double(conv.weight), double(conv.bias), double(bn.running_mean),
                                        double(bn.running_var), bn.eps, double(bn.weight), double(bn.bias))
    return weight.detach(), bias.detach()


def _expect_conv(conv, cin, cout, k, stride) -> None:
    if not (type(conv) is nn.Conv2d and conv.in_channels == cin and conv.out_channels == cout
            and conv.kernel_size == (k, k) and conv.stride == (stride, stride)
            and conv.padding == ((k - 1) // 2,) * 2 and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"):
        raise NotLowered(f"{conv!r} is not the {k}x{k} {cin}->{cout} convolution (stride "
                         f"{stride}) of a CIFAR ResNet")


def _expect_bn(bn, channels) -> None:
    if not (type(bn) is nn.BatchNorm2d and bn.num_features == channels):
        raise NotLowered(f"{bn!r} is not a BatchNorm2d of {channels} channels")
    if bn.running_mean is None or bn.running_var is None:
        raise NotLowered("a BatchNorm has no running statistics")


def _expect_relu(relu) -> None:
    if type(relu) is not nn.ReLU:
        raise NotLowered(f"{relu!r} is not the ReLU of a CIFAR ResNet")


def cifar_resnet_parts(member: nn.Module) -> tuple:
    """``(means [3], sds [3], resnet)`` of a member the kernel runs: a
    `drt_fast.models.cifar_resnet.ResNet` of BasicBlocks in eval mode, behind an optional
    `NormalizeLayer`; else `NotLowered` with the reason."""
    from ..models.cifar_resnet import BasicBlock, ResNet

    means, sds, net = torch.zeros(3), torch.ones(3), member
    if type(member) is nn.Sequential and len(member) == 2 and type(member[0]) is NormalizeLayer:
        means, sds, net = member[0].means.flatten(), member[0].sds.flatten(), member[1]
    if type(net) is not ResNet:
        raise NotLowered("it is not a CIFAR ResNet (drt_fast.models.cifar_resnet)")
    if means.numel() != 3:
        raise NotLowered(f"its input normalization has {means.numel()} channels, not 3")
    if member.training:
        raise NotLowered("it is in training mode")
    _expect_conv(net.conv1, 3, 16, 3, 1)
    _expect_bn(net.bn1, 16)
    _expect_relu(net.relu)
    layers = (net.layer1, net.layer2, net.layer3)
    if len({len(layer) for layer in layers}) != 1 or len(net.layer1) < 1:
        raise NotLowered("its stages do not have the same number of blocks")
    for s, layer in enumerate(layers):
        ch = 16 << s
        for b, block in enumerate(layer):
            if type(block) is not BasicBlock:
                raise NotLowered("its blocks are not BasicBlocks")
            entry = s > 0 and b == 0
            _expect_conv(block.conv1, ch // 2 if entry else ch, ch, 3, 2 if entry else 1)
            _expect_conv(block.conv2, ch, ch, 3, 1)
            _expect_bn(block.bn1, ch)
            _expect_bn(block.bn2, ch)
            _expect_relu(block.relu)
            if entry:
                ds = block.downsample
                if not (type(ds) is nn.Sequential and len(ds) == 2):
                    raise NotLowered("a stage's first block has no 1x1 downsample")
                _expect_conv(ds[0], ch // 2, ch, 1, 2)
                _expect_bn(ds[1], ch)
            elif block.downsample is not None:
                raise NotLowered("a block has a downsample where the kernel has none")
    if not (type(net.avgpool) is nn.AvgPool2d and net.avgpool.kernel_size == 8
            and type(net.fc) is nn.Linear and net.fc.in_features == 64):
        raise NotLowered("its head is not AvgPool2d(8) and a linear layer of 64 inputs")
    return means, sds, net


def cifar_resnet_for_inference(member: nn.Module, variant: int = 1) -> InferenceMember:
    """``member`` as a `CifarResNetMember` running the kernel's ``variant`` (1: mma.sync,
    0: wmma) (``InferenceMember.fused``: its convolutions, ``folded_bn``: its BatchNorms), or
    the member itself with the reason."""
    try:
        means, sds, net = cifar_resnet_parts(member)
    except NotLowered as err:
        return InferenceMember(member, reason=str(err))
    convs = [fold_conv_bn(net.conv1, net.bn1)]
    convs[0] = (torch.nn.functional.pad(convs[0][0], (0, 0, 0, 0, 0, 13)), convs[0][1])  # 3 -> 16 inputs
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            convs.append(fold_conv_bn(block.conv1, block.bn1))
            if block.downsample is not None:
                convs.append(fold_conv_bn(block.downsample[0], block.downsample[1]))
            convs.append(fold_conv_bn(block.conv2, block.bn2))
    weights = torch.cat([ops.pack_cifar_resnet_weight(w, variant) for w, _ in convs]).to(torch.bfloat16)
    biases = torch.cat([b for _, b in convs]).float()
    norm = torch.cat([means, sds]).float()
    device = net.fc.weight.device
    fc_b = net.fc.bias.detach() if net.fc.bias is not None else torch.zeros(net.fc.out_features, device=device)
    module = CifarResNetMember(weights.to(device), biases.to(device), norm.to(device),
                               net.fc.weight.detach().float().clone(), fc_b.float().clone(),
                               len(net.layer1), variant)
    return InferenceMember(module, folded_bn=len(convs), fused=len(convs))
