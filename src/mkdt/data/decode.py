"""Helpers shared by the format modules: image decoding with Pillow, decoded arrays to `Splits`,
labels, per-channel statistics, and file reads and error reasons for DataError messages."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mkdt.data.types import CHUNK, Splits, Stats
from mkdt.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
REFETCH = "fetch the files again (data.download=true into an empty folder)"
PROGRESS_DELAY_S = 2.0  # decoding bars appear only when decoding is slow, i.e. for big datasets
_MIN_STD = 1e-6


def channel_stats(images: torch.Tensor) -> Stats:
    """Per-channel mean and std of uint8 images in [0, 1] units (exact int64 sums, then
    float64); a zero std is raised to a tiny value so that normalising stays finite."""
    total = torch.zeros(images.shape[1], dtype=torch.int64)
    squares = torch.zeros(images.shape[1], dtype=torch.int64)
    for chunk in images.split(CHUNK):
        wide = chunk.to(torch.int64)
        total += wide.sum(dim=(0, 2, 3))
        squares += (wide * wide).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total.double() / (count * 255)
    var = squares.double() / (count * 255**2) - mean**2
    std = var.clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return tuple(mean.tolist()), tuple(std.tolist())


def to_labels(values: Any) -> torch.Tensor:
    """Labels as an int64 tensor."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


def decode_image(data: bytes, where: str, mode: str | None = None) -> np.ndarray:
    """Image bytes -> (H, W) grayscale or (H, W, 3) RGB uint8 array (or converted to `mode`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            return np.asarray(image if image.mode == target else image.convert(target))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot decode image {where} ({reason(err)}); the file is corrupt: replace it, or move "
            "it out of the dataset folder"
        ) from err


def _pil_resize(array: np.ndarray, size: int) -> np.ndarray:
    """One decoded image resized to size x size with Pillow's (antialiased) bilinear filter."""
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


def decode_resized(data: bytes, where: str, size: int) -> np.ndarray:
    """Image bytes -> (size, size, 3) RGB uint8 array: the whole image resized (squashed, not
    cropped) with Pillow's antialiased bilinear filter, as mixed-size trees are."""
    return _pil_resize(decode_image(data, where, "RGB"), size)


def _to_tensor(arrays: list[np.ndarray], channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) or (H, W, 3) arrays stacked into an (N, channels, H, W) uint8 tensor; grayscale
    images are repeated over the channels."""
    batch = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, array in enumerate(arrays):
        batch[i] = array if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(batch)


def arrays_to_splits(
    train: list[tuple[np.ndarray, int]],
    test: list[tuple[np.ndarray, int]],
    classes: tuple[str, ...],
    resolution: int | None,
    where: str,
) -> Splits:
    """Splits from decoded (array, label) pairs: RGB unless every image is grayscale.

    Images must share one size, unless `resolution` is given: then mixed sizes are all resized
    to it (and Splits.resized is set).
    """
    sizes = {array.shape[:2] for array, _ in train + test}
    resized = len(sizes) > 1
    if resized:
        if resolution is None:
            (h1, w1), (h2, w2) = sorted(sizes)[:2]
            raise DataError(
                f"images in {where} have different sizes (e.g. {w1}x{h1} and "
                f"{w2}x{h2}); pass data.resolution=<pixels> to resize every image "
                "while loading"
            )
        train = [(_pil_resize(array, resolution), label) for array, label in train]
        test = [(_pil_resize(array, resolution), label) for array, label in test]
        size = (resolution, resolution)
    else:
        size = sizes.pop()
    channels = 3 if any(array.ndim == 3 for array, _ in train + test) else 1
    return Splits(
        _to_tensor([array for array, _ in train], channels, size),
        to_labels([label for _, label in train]),
        _to_tensor([array for array, _ in test], channels, size),
        to_labels([label for _, label in test]),
        classes,
        resized,
    )


def reason(err: BaseException) -> str:
    """An exception's message on one line, at most ~200 characters, for DataError messages."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def read_bytes(path: Path) -> bytes:
    """A file's contents, or DataError naming the file."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(
            f"cannot read {path} ({err.strerror or reason(err)}); check that the dataset is complete"
        ) from err
