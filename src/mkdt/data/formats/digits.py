"""scikit-learn's 8x8 digits, which ship with the library and need no files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mkdt.data.decode import to_labels
from mkdt.data.types import Splits


def locate_nothing(root: Path | None) -> None:
    """Datasets that ship with a library need no files."""
    return None


def decode_digits(source: Path | None, resolution: int | None) -> Splits:
    """scikit-learn's 8x8 digits scaled to 0..255, split 80/20 stratified with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None])
    labels = to_labels(digits.target)
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=digits.target, random_state=0
    )
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    classes = tuple(str(digit) for digit in range(10))
    return Splits(images[train], labels[train], images[test], labels[test], classes)
