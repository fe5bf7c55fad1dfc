"""CIFAR-10 and CIFAR-100 in torchvision's python pickle format (or as an ImageFolder
folder/archive with train/ and test/), and their download with torchvision."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from mkdt.data.decode import REFETCH, reason, to_labels
from mkdt.data.formats.imagefolder import decode_imagefolder, is_split_tree
from mkdt.data.types import Splits
from mkdt.errors import DataError


class _CifarFormat(NamedTuple):
    """File names and keys of one CIFAR variant in the python format."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


CIFAR10 = _CifarFormat(
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    "labels",
    "label_names",
)
CIFAR100 = _CifarFormat(
    "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"
)


def _cifar_files(fmt: _CifarFormat) -> str:
    """The files of a CIFAR folder, for messages."""
    return ", ".join((*fmt.train_files, fmt.test_file, fmt.meta_file))


def locate_cifar(fmt: _CifarFormat, root: Path | None) -> Path:
    """The pickle folder (root/<folder>, or root itself), else root if it is an ImageFolder
    tree with train/ and test/ or an archive."""
    assert root is not None  # the CIFAR specs have a default root
    for candidate in (root / fmt.folder, root):
        if (candidate / fmt.meta_file).is_file():
            return candidate
    if is_split_tree(root):
        return root
    raise DataError(
        f"{fmt.title} not found at {root}: expected {root}/{fmt.folder}/ "
        f"({_cifar_files(fmt)}) or an ImageFolder folder/archive with train/ and "
        f"test/; point data.root at the folder that contains {fmt.folder}, "
        "or pass data.download=true"
    )


def _unpickle(path: Path, fmt: _CifarFormat) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the originals are Python 2 pickles). Pickles can
    run code: only load files from a trusted source."""
    if not path.is_file():
        raise DataError(f"missing {path}: {fmt.title} needs {_cifar_files(fmt)} in {path.parent}; {REFETCH}")
    try:
        with path.open("rb") as file:
            content = pickle.load(file, encoding="latin1")
    except Exception as err:  # truncated or foreign pickles fail in many ways
        raise DataError(
            f"cannot unpickle {path} ({type(err).__name__}: {reason(err)}); the file is corrupt: {REFETCH}"
        ) from err
    if not isinstance(content, dict):
        raise DataError(f"{path} does not hold a {fmt.title} dict; {REFETCH}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_batch(path: Path, fmt: _CifarFormat, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Images (N, 3, 32, 32) and labels (N,) of one CIFAR batch file, validated."""
    batch = _unpickle(path, fmt)
    if "data" not in batch or fmt.label_key not in batch:
        raise DataError(
            f"{path} lacks the 'data' or '{fmt.label_key}' entry of a {fmt.title} batch; {REFETCH}"
        )
    data, labels = np.asarray(batch["data"]), np.asarray(batch[fmt.label_key])
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32
        or labels.shape != data.shape[:1]
    ):
        raise DataError(
            f"{path} holds data {data.dtype} {data.shape} and labels {labels.shape}, "
            f"expected uint8 (N, 3072) and (N,); the file is corrupt: {REFETCH}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; the file is corrupt: {REFETCH}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), to_labels(labels)


def decode_cifar(fmt: _CifarFormat, source: Path | None, resolution: int | None) -> Splits:
    """The CIFAR pickles in source, or source decoded as an ImageFolder tree/archive."""
    assert source is not None  # locate_cifar never returns None
    if not (source / fmt.meta_file).is_file():
        return decode_imagefolder(source, resolution)
    names = _unpickle(source / fmt.meta_file, fmt).get(fmt.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{source / fmt.meta_file} lacks '{fmt.names_key}'; {REFETCH}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    train = [_cifar_batch(source / file, fmt, len(classes)) for file in fmt.train_files]
    test_images, test_labels = _cifar_batch(source / fmt.test_file, fmt, len(classes))
    return Splits(
        torch.cat([images for images, _ in train]),
        torch.cat([labels for _, labels in train]),
        test_images,
        test_labels,
        classes,
    )


def download_cifar(fmt: _CifarFormat, root: Path) -> None:
    """Fetch a CIFAR variant with torchvision into root/<folder>."""
    from torchvision import datasets

    (datasets.CIFAR10 if fmt is CIFAR10 else datasets.CIFAR100)(str(root), download=True)
