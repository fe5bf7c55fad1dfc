"""Fashion-MNIST in the idx format (train-/t10k- images and labels, each optionally gzipped),
from the Debian package dataset-fashion-mnist or a torchvision download."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from mkdt.data.cache import raw_root
from mkdt.data.decode import read_bytes, reason, to_labels
from mkdt.data.types import Splits
from mkdt.errors import DataError

_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def fashion_root() -> Path:
    """The Debian package's folder if installed, else the default download folder."""
    return _DEBIAN_FASHION if _DEBIAN_FASHION.is_dir() else raw_root("fashion-mnist")


def locate_fashion(root: Path | None) -> Path:
    """The folder with the idx files: root itself, or torchvision's root/FashionMNIST/raw."""
    assert root is not None  # the spec has a default root
    for candidate in (root, root / "FashionMNIST" / "raw"):
        if any((candidate / f"{_FASHION_FILES[0]}{ext}").is_file() for ext in ("", ".gz")):
            return candidate
    raise DataError(
        f"Fashion-MNIST not found at {root}: expected {', '.join(_FASHION_FILES)} "
        "(each optionally .gz); install the Debian package dataset-fashion-mnist, "
        "point data.root at the folder with these files, or pass data.download=true"
    )


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray:
    """The array in folder/stem or folder/stem.gz, checked against its idx header."""
    path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
    if path is None:
        raise DataError(
            f"missing {folder / stem} (or .gz): Fashion-MNIST needs "
            f"{', '.join(_FASHION_FILES)}; pass data.download=true"
        )
    raw = read_bytes(path)
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"cannot decompress {path} ({reason(err)}); the file is corrupt: re-download it"
            ) from err
    return _parse_idx(raw, magic, path)


def _parse_idx(raw: bytes, magic: int, path: Path) -> np.ndarray:
    """An idx array of unsigned bytes: big-endian magic number and dimensions, then the data."""
    found = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or found != magic:
        raise DataError(
            f"{path} has idx magic number {found}, expected {magic}; it is not the "
            "right Fashion-MNIST file: re-download it"
        )
    header = 4 + 4 * raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else ()
    if len(raw) < header or len(raw) - header != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated or corrupt: its header promises shape {dims} but "
            f"{len(raw) - header} data bytes follow; re-download it"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _fashion_split(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) and labels of the train or t10k files, checked against each other."""
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0] or (labels.size and labels.max() > 9):
        raise DataError(
            f"the {prefix} files in {folder} hold {images.shape[0]} images and "
            f"{labels.shape[0]} labels up to {labels.max(initial=0)}, expected as many "
            "labels as images, in 0..9; re-download them"
        )
    return torch.from_numpy(images[:, None].copy()), to_labels(labels)


def decode_fashion(source: Path | None, resolution: int | None) -> Splits:
    """The four Fashion-MNIST idx files in source."""
    assert source is not None  # locate_fashion never returns None
    train_images, train_labels = _fashion_split(source, "train")
    test_images, test_labels = _fashion_split(source, "t10k")
    return Splits(train_images, train_labels, test_images, test_labels, _FASHION_CLASSES)


def download_fashion(root: Path) -> None:
    """Fetch Fashion-MNIST with torchvision into root/FashionMNIST/raw."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), download=True)
