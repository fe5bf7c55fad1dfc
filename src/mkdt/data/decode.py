"""Helpers shared by the format modules: image decoding with Pillow, decoded arrays to `Splits`,
labels, per-channel statistics, and file reads and error reasons for DataError messages.

Every image becomes 8-bit grey (H, W) or 8-bit RGB (H, W, 3), by the rule of its Pillow mode:

- ``L`` and ``RGB`` are kept; ``1`` becomes 0 and 255; ``LA``, ``RGBA`` and ``RGBX`` drop their
  alpha (or padding) band, ``La`` and ``RGBa`` (premultiplied alpha) are first divided by their
  alpha as Pillow converts them (value * 255 // alpha); ``P`` and ``PA`` look their palette up as
  RGB; ``CMYK`` becomes RGB as Pillow converts it (R = (255 - C)(255 - K) / 255, rounded),
  ``YCbCr`` by the JPEG (JFIF) equations and ``HSV`` as ``colorsys.hsv_to_rgb``;
- 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) is scaled, not clamped: value * 255 /
  max rounded half up, where max is 65535, or 2**bits - 1 for a TIFF that declares fewer bits per
  sample (e.g. 4095 for 12 bits); so 16-bit value v becomes round(v / 257);
- 32-bit float grey (``F``) in [0, 1] becomes round(value * 255) (half up); other floats (or NaN)
  are refused, since their range is unknown;
- refused with a one-line DataError: ``I`` (32-bit or signed integers: no declared range maps them
  to 8 bits), ``LAB`` (Pillow has no colour conversion of it to RGB) and any mode not listed here.

Pillow itself reads 16-bit RGB(A) PNGs and 16-bit CMYK TIFFs as 8 bits per band (the high byte).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mkdt.data.memory import CHUNK, check_memory
from mkdt.data.types import Splits, Stats
from mkdt.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
# Pillow conversions, in order, that give 8-bit grey or RGB pixels (an empty chain: kept as read)
_TO_8BIT: dict[str, tuple[str, ...]] = {
    "L": (),
    "RGB": (),
    "1": ("L",),
    "LA": ("L",),
    "La": ("LA", "L"),
    "RGBA": ("RGB",),
    "RGBX": ("RGB",),
    "RGBa": ("RGB",),
    "P": ("RGB",),
    "PA": ("RGB",),
    "CMYK": ("RGB",),
    "YCbCr": ("RGB",),
    "HSV": ("RGB",),
}
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_REFUSED = {
    "I": "32-bit or signed integer pixels (mode I), whose range has no standard mapping to 8 bits",
    "LAB": "CIELAB colours (mode LAB), which mkdt does not convert to RGB",
}
_TIFF_BITS_PER_SAMPLE = 258
_SAVE_AS = "save it as an 8- or 16-bit PNG or JPEG, or move it out of the dataset folder"
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
    """Image bytes -> (H, W) grey or (H, W, 3) RGB uint8 array (by the rules of the module
    docstring), then converted to `mode` ("L" or "RGB") if given."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            array = to_8bit(image, where)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot decode image {where} ({reason(err)}); the file is corrupt: replace it, or move "
            "it out of the dataset folder"
        ) from err
    if mode is None or mode == ("L" if array.ndim == 2 else "RGB"):
        return array
    return np.asarray(Image.fromarray(array).convert(mode))


def to_8bit(image: Image.Image, where: str) -> np.ndarray:
    """An opened image's pixels as an (H, W) grey or (H, W, 3) RGB uint8 array, by the rules of
    the module docstring; DataError naming `where` for a refused mode."""
    if image.mode in _SIXTEEN_BIT:
        return _scaled_to_8bit(np.asarray(image), _declared_max(image))
    if image.mode == "F":
        return _unit_floats_to_8bit(np.asarray(image), where)
    chain = _TO_8BIT.get(image.mode)
    if chain is None:
        problem = _REFUSED.get(image.mode, f"pixels of mode {image.mode}, which mkdt does not read")
        raise DataError(f"image {where} has {problem}; {_SAVE_AS}")
    for mode in chain:
        image = image.convert(mode)
    return np.asarray(image)


def _declared_max(image: Image.Image) -> int:
    """The largest value of a 16-bit grey image: 65535, or 2**bits - 1 for a TIFF declaring
    fewer bits per sample."""
    tags = getattr(image, "tag_v2", None)
    bits = tags.get(_TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return 2**bits - 1 if isinstance(bits, int) and 1 <= bits < 16 else 65535


def _scaled_to_8bit(values: np.ndarray, top: int) -> np.ndarray:
    """Unsigned integers in [0, top] -> uint8 round(value * 255 / top), half up, exactly (values
    above top, which the file does not declare, become 255)."""
    wide = np.minimum(values.astype(np.int64), top)
    return ((2 * 255 * wide + top) // (2 * top)).astype(np.uint8)


def _unit_floats_to_8bit(values: np.ndarray, where: str) -> np.ndarray:
    """Floats in [0, 1] -> uint8 round(value * 255), half up; DataError for any other value."""
    finite = np.isfinite(values)
    if not finite.all() or values.min() < 0 or values.max() > 1:
        seen = (
            "NaN or infinite values"
            if not finite.all()
            else f"values in [{values.min():.4g}, {values.max():.4g}]"
        )
        raise DataError(
            f"image {where} has 32-bit float pixels (mode F) with {seen}; mkdt reads float images "
            f"only in [0, 1]: {_SAVE_AS}"
        )
    return np.floor(values.astype(np.float64) * 255 + 0.5).astype(np.uint8)


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
    channels = 3 if any(array.ndim == 3 for array, _ in train + test) else 1
    resized = len(sizes) > 1
    if resized:
        if resolution is None:
            (h1, w1), (h2, w2) = sorted(sizes)[:2]
            raise DataError(
                f"images in {where} have different sizes (e.g. {w1}x{h1} and "
                f"{w2}x{h2}); pass data.resolution=<pixels> to resize every image "
                "while loading"
            )
        check_memory(len(train) + len(test), channels, resolution, f"{where} at data.resolution={resolution}")
        train = [(_pil_resize(array, resolution), label) for array, label in train]
        test = [(_pil_resize(array, resolution), label) for array, label in test]
        size = (resolution, resolution)
    else:
        size = sizes.pop()
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
