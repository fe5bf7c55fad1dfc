"""Helpers for the formats that list their images in index files (FGVC-Aircraft, CUB-200-2011,
Stanford Dogs, Flowers-102): reading the text and MATLAB .mat lists, and decoding the listed
images, whose sizes differ, at one resolution."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from mkdt.data.decode import PROGRESS_DELAY_S, arrays_to_splits, decode_resized, read_bytes, reason
from mkdt.data.memory import check_memory
from mkdt.data.types import Splits
from mkdt.errors import DataError
from mkdt.runtime import progress

DECODE_SIZE = 64  # pixels when no resolution is asked: the paper's largest (Tiny ImageNet's)
DAMAGED = "the file is damaged: fetch the dataset again"
Item = tuple[Path, int]  # an image file and its 0-based label


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of every non-blank line of a text file; an empty file raises
    DataError."""
    text = read_bytes(path).decode("utf-8", "replace")
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, line) for number, line in lines if line]
    if not lines:
        raise DataError(f"{path} is empty; {DAMAGED}")
    return lines


def read_pairs(path: Path) -> list[tuple[int, str, str]]:
    """(line number, key, value) of every line '<key> <value>' of a list file (the value may
    hold spaces)."""
    pairs = []
    for number, line in read_lines(path):
        key, _, value = line.partition(" ")
        if not value.strip():
            raise DataError(f"{path} line {number} is not '<id> <value>'; {DAMAGED}")
        pairs.append((number, key, value.strip()))
    return pairs


def read_mat(path: Path, keys: tuple[str, ...]) -> list[np.ndarray]:
    """The named variables of a MATLAB .mat file as 1-D arrays (a cell array of strings becomes
    an object array of str)."""
    from scipy.io import loadmat

    data = read_bytes(path)
    try:
        content = loadmat(io.BytesIO(data), squeeze_me=True)
    except Exception as err:  # scipy raises many types for damaged or foreign files
        raise DataError(f"cannot read {path} as a MATLAB .mat file ({reason(err)}); {DAMAGED}") from err
    missing = [key for key in keys if key not in content]
    if missing:
        raise DataError(f"{path} has no {missing[0]!r} variable; it is not the official file: fetch it again")
    return [np.atleast_1d(content[key]).ravel() for key in keys]


def whole_numbers(values: np.ndarray, path: Path, key: str, high: int | None = None) -> list[int]:
    """Numbers that MATLAB stores as doubles, checked to be whole and in 1..high (high: no
    upper bound when None)."""
    try:
        numbers = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        numbers = np.array([np.nan])
    valid = np.isfinite(numbers) & (numbers == np.round(numbers)) & (numbers >= 1)
    if high is not None:
        valid &= numbers <= high
    if numbers.size == 0 or not valid.all():
        bound = "" if high is None else f" up to {high}"
        raise DataError(f"{path} variable {key!r} must hold whole numbers from 1{bound}; {DAMAGED}")
    return numbers.astype(np.int64).tolist()


def decode_listed(
    name: str, train: list[Item], test: list[Item], classes: tuple[str, ...], size: int | None, source: Path
) -> Splits:
    """Splits of the listed images, each decoded as RGB and resized to size x size (squashed,
    not cropped). Splits.resized is set, so the cache keys the tensors by size."""
    assert size is not None  # load_dataset passes the spec's resolution when none is asked
    if not train:
        raise DataError(f"the lists in {source} name no training images; {DAMAGED}")
    check_memory(len(train) + len(test), 3, size, f"{name} at data.resolution={size}")
    decoded = [
        (decode_resized(read_bytes(path), str(path), size), label)
        for path, label in progress(
            train + test, desc=f"decoding {name}", unit="img", leave=False, delay=PROGRESS_DELAY_S
        )
    ]
    splits = arrays_to_splits(decoded[: len(train)], decoded[len(train) :], classes, size, str(source))
    return splits._replace(resized=True)
