"""Shared pytest fixtures. Keep this small: test modules own their helpers."""
import pytest
import torch


@pytest.fixture
def cuda_device():
    """A CUDA device with drt_fast's CUDA kernels built, or skip (name CUDA tests with "cuda")."""
    import drt_fast

    if not (torch.cuda.is_available() and drt_fast.cuda_available()):
        pytest.skip("needs a CUDA device and drt_fast built with CUDA kernels")
    return torch.device("cuda")
