"""The fused sampling hot path as torch custom ops, and their pure-torch references.

Registered under ``torch.ops.drt_fast`` when this package is imported (contracts in
docs/internals.md, "Ops"):

* ``noisy_draws`` (`noise`): each input repeated over its draws plus counter-based
  Gaussian noise, bit-identical on CPU, GPU and in the reference;
* ``noisy_draws_discrete`` (`discrete_noise`): inputs on a grid plus the Gaussian rounded to
  that grid (`rounded_gaussian`), drawn exactly by integer comparisons, bit-identical likewise;
* ``vote_`` (`vote`): per draw, aggregate the members, count the winning class in place;
* ``bias_act_`` and ``dense_chain`` (`dense`): the CPU kernels of dense members;
* ``cifar_resnet`` (`cifar_resnet`): a whole CIFAR ResNet forward in one CUDA kernel.

Each op has an eager twin without the dispatcher (``*_eager``, ``*_cpu``), a fake kernel
and a pure-torch reference (`reference`) that runs under the reference switch
(`use_reference`, ``DRT_FAST_REFERENCE_OPS=1``) and where the compiled kernels do not
(`extension`). This package is the only caller of the compiled ``_C`` / ``_C_cuda``
modules: every check on device, dtype, shape and contiguity (`checks`) happens before a
pointer crosses into C++.
"""
from ..validate import AGGREGATIONS
from . import checks, cifar_resnet_layout, extension, reference, selfcheck
from .checks import LOGIT_DTYPES, NOISE_DTYPES
# (the op `cifar_resnet` takes the place of its module's attribute here: reach the module
# by `from drt_fast.ops.cifar_resnet import ...`)
from .cifar_resnet import (cifar_resnet, cifar_resnet_binding_args, cifar_resnet_eager, cifar_resnet_on_host,
                           cifar_resnet_snapshot)
from .cifar_resnet_layout import (CIFAR_RESNET_REGIONS, CIFAR_RESNET_VARIANTS, cifar_resnet_convs,
                                  cifar_resnet_map, mma_tile_order, pack_cifar_resnet_weight,
                                  unpack_cifar_resnet_weight)
from .dense import bias_act_, bias_act_cpu_, dense_chain, dense_chain_cpu
from .discrete_noise import first_off_grid, grid_indices, noisy_draws_discrete, noisy_draws_discrete_eager, to_grid
from .extension import (CudaStatus, Extensions, arch_covers, cuda_available, cuda_status, extensions,
                        kernels_run_on, reference_in_use, use_reference)
from .noise import noisy_draws, noisy_draws_eager
from .reference import (philox4x32_10, reference_bias_act_, reference_cifar_resnet, reference_dense_chain,
                        reference_discrete_noise, reference_labels, reference_noisy_draws,
                        reference_noisy_draws_discrete, reference_normals, reference_vote_)
from .rounded_gaussian import DiscreteTable, discrete_table
from .vote import AGGREGATION_CODES, vote_, vote_eager_

__all__ = [
    "noisy_draws", "noisy_draws_eager", "vote_", "vote_eager_",
    "noisy_draws_discrete", "noisy_draws_discrete_eager", "grid_indices", "first_off_grid", "to_grid",
    "DiscreteTable", "discrete_table",
    "bias_act_", "bias_act_cpu_", "dense_chain", "dense_chain_cpu",
    "cifar_resnet", "cifar_resnet_eager", "cifar_resnet_on_host", "cifar_resnet_snapshot",
    "cifar_resnet_binding_args", "cifar_resnet_convs", "cifar_resnet_map", "mma_tile_order",
    "pack_cifar_resnet_weight", "unpack_cifar_resnet_weight",
    "CIFAR_RESNET_REGIONS", "CIFAR_RESNET_VARIANTS",
    "reference_noisy_draws", "reference_vote_", "reference_labels", "reference_normals",
    "reference_noisy_draws_discrete", "reference_discrete_noise",
    "reference_bias_act_", "reference_dense_chain", "reference_cifar_resnet", "philox4x32_10",
    "cuda_available", "arch_covers", "kernels_run_on", "use_reference", "reference_in_use",
    "Extensions", "extensions", "CudaStatus", "cuda_status",
    "AGGREGATIONS", "AGGREGATION_CODES", "NOISE_DTYPES", "LOGIT_DTYPES",
]
