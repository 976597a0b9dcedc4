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


@pytest.fixture(scope="module")
def one_thread():
    """Run torch (and our OpenMP kernels) on one thread for a test module, then restore.

    Tiny tensors gain nothing from a second thread, and when the 2 cores are shared with
    other processes OpenMP's spin-waiting makes them many times slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """The GPU runs of drt-fast's whole-network CIFAR ResNet kernel go last.

    It is the one kernel that has not yet run on a GPU (it is tested on the host, see
    tests/test_cifar_resnet_kernel.py); a fault in it would poison the CUDA context of the
    process, failing every CUDA test after it. Last, it can only fail itself.
    """
    def runs_the_kernel_on_a_gpu(item):
        module = getattr(item, "module", None)    # (items that are not test functions have none)
        return (module is not None and module.__name__.endswith("test_cifar_resnet_kernel")
                and "cuda_device" in getattr(item, "fixturenames", ()))

    items.sort(key=runs_the_kernel_on_a_gpu)      # stable: the rest keep their order
