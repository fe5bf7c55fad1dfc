"""Session fixtures for the real data beside the repository (../shared/data); the tests that use
them skip when it is absent."""

import os
from pathlib import Path

import pytest

from mkdt.data import ImageData, load_dataset


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset cache for the whole session, so that real data is decoded at most once."""
    return tmp_path_factory.mktemp("mkdt-cache")


@pytest.fixture(scope="session")
def cifar10_jpeg_archive() -> Path:
    """../shared/data/cifar10-jpeg.tar.xz ($MKDT_SHARED_DATA overrides the folder), or skip."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    folder = os.environ.get("MKDT_SHARED_DATA") or default
    archive = Path(folder) / "cifar10-jpeg.tar.xz"
    if not archive.is_file():
        pytest.skip(f"{archive} is absent (set MKDT_SHARED_DATA to the folder that holds it)")
    return archive


@pytest.fixture(scope="session")
def cifar10_jpeg(cifar10_jpeg_archive: Path, data_cache_dir: Path) -> ImageData:
    """All of CIFAR-10 decoded from the shared JPEG archive (cached in data_cache_dir)."""
    return load_dataset("cifar10", root=cifar10_jpeg_archive, cache_dir=data_cache_dir)


def pytest_configure(config: pytest.Config) -> None:
    """Tests use tiny tensors: one intra-op thread is as fast, and it does not spin-wait when
    another process holds the second core (2 threads made some modules 20x slower on a busy
    2-core machine)."""
    import torch

    torch.set_num_threads(1)
