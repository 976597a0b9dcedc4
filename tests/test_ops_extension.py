"""drt_fast.ops.extension: which implementation runs an op. A missing build raises a clear
ImportError. (The build itself: test_build.py.)"""
import pytest
import torch

import drt_fast
from drt_fast import ops


def _noisy_args():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 3, 3, generator=gen)
    return (x, torch.tensor([3, 9]), torch.tensor([0, 5]), 4, 0.5, 7)


def test_missing_cpu_kernels_raise_import_error(monkeypatch):
    monkeypatch.setattr(ops.extension, "cpu_kernels", None)
    monkeypatch.setattr(ops.extension, "cpu_import_error", ImportError("no module"))
    with pytest.raises(ImportError, match="pip install"):
        ops.noisy_draws(*_noisy_args())


def test_cuda_available_is_a_bool():
    assert isinstance(drt_fast.cuda_available(), bool)
    assert drt_fast.cuda_available() is ops.cuda_available()
