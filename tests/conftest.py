"""Shared pytest fixtures."""

import pytest

from cifar_files import write_fake_cifar10


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> str:
    """Root of a small fake CIFAR-10 folder (200 train + 60 test images); pass it as ``data_dir``."""
    return write_fake_cifar10(tmp_path_factory.mktemp("cifar10"))
