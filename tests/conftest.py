"""Shared pytest fixtures."""

import pytest

from cifar_files import write_fake_cifar10


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    """Root of a small fake CIFAR-10 folder (200 train + 60 test images); pass it as ``data_dir``."""
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that pins torch's thread count (benchmarks and figure runs called in-process do) leaves it as found:
    later tests keep the process' setting."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
