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


@pytest.fixture
def gloo_mesh():
    """A 1-D device mesh over a 1-process gloo group, for FSDP2's ``fully_shard`` in this process; the group is
    destroyed after the test, so no other test sees ``torch.distributed`` initialised."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()
