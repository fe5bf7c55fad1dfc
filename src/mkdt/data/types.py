"""The dataset types: `ImageData` (a labelled dataset as uint8 tensors), `Splits` (what a format's
decoder returns) and `DatasetSpec` (how to find, fetch and decode one registered dataset)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mkdt.data.memory import CHUNK, check_memory
from mkdt.errors import DataError

Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True, eq=False)
class ImageData:
    """A labelled image dataset held as uint8 tensors.

    Images are (N, C, H, W) uint8 and contiguous, labels (N,) int64 in [0, num_classes);
    mean and std are per channel, in [0, 1] units.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        """Reject tensors that break the contract above (ValueError: a bug, not a user error)."""
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(
                    f"{split}_images must be (N, C, H, W) uint8, got {images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels must be ({images.shape[0]},) int64, got "
                    f"{labels.dtype} {tuple(labels.shape)}"
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.classes)):
                raise ValueError(f"{split}_labels must lie in [0, {len(self.classes)})")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError("train and test images must have the same (C, H, W)")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels: 1 (grayscale) or 3 (RGB)."""
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        """Image height in pixels (images are square after `load_dataset`)."""
        return self.train_images.shape[2]

    @property
    def num_train(self) -> int:
        """Number of training images."""
        return self.train_images.shape[0]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float in [0, 255]) (..., C, H, W) images -> float32 (x/255 - mean)/std,
        on the images' device."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device)
        return (images.float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)

    def subset(self, n: int, seed: int) -> ImageData:
        """A class-balanced subset of n training images, chosen reproducibly from `seed`.

        Each class gets n // num_classes images and the first classes one more each until n is
        reached (a class with too few images gives its share to the others). Images keep their
        original order; the test split and statistics are unchanged. n >= num_train returns self.
        """
        if n >= self.num_train:
            return self
        if n < 1:
            raise DataError(f"a subset needs at least 1 image, got {n}; ask for a positive size")
        generator = torch.Generator().manual_seed(seed)
        counts = torch.bincount(self.train_labels, minlength=self.num_classes).tolist()
        chosen = []
        for label, quota in enumerate(_class_quotas(counts, n)):
            members = (self.train_labels == label).nonzero().flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[:quota]])
        index = torch.cat(chosen).sort().values
        return replace(self, train_images=self.train_images[index], train_labels=self.train_labels[index])

    def resized(self, size: int) -> ImageData:
        """Both splits resized to size x size (antialiased bilinear on floats, rounded back to
        uint8). The same size returns self."""
        if self.train_images.shape[2:] == (size, size):
            return self
        if size < 1:
            raise DataError(f"data.resolution must be a positive number of pixels, got {size}")
        check_memory(
            self.num_train + len(self.test_images),
            self.channels,
            size,
            f"{self.name} at data.resolution={size}",
        )
        return replace(
            self, train_images=_resize(self.train_images, size), test_images=_resize(self.test_images, size)
        )


class Splits(NamedTuple):
    """What a decoder returns: both splits as tensors, before statistics are attached."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    resized: bool = False  # True when mixed-size images were resized to the requested resolution


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, fetch and decode one registered dataset.

    locate(root) returns the source to decode (a folder or archive; None when the dataset needs
    no files) or raises DataError; decode(source, resolution) returns its Splits; download(root)
    fetches the files into root. default_root() gives the root when none is passed. stats are
    published normalisation values (None: computed from the training images). resolution is the
    size that `load_dataset` decodes at when it is given none (None: the images' own size), for
    formats whose images differ in size.
    """

    description: str
    locate: Callable[[Path | None], Path | None]
    decode: Callable[[Path | None, int | None], Splits]
    default_root: Callable[[], Path] | None = None
    stats: Stats | None = None
    download: Callable[[Path], None] | None = None
    resolution: int | None = None


def _class_quotas(counts: list[int], n: int) -> list[int]:
    """Split n (< sum(counts)) over the classes as evenly as possible, earlier classes taking
    the remainder, and no class more than it holds."""
    quotas = [0] * len(counts)
    remaining = n
    open_classes = [c for c, count in enumerate(counts) if count > 0]
    while remaining > 0:
        share, extra = divmod(remaining, len(open_classes))
        for rank, c in enumerate(open_classes):
            take = min(share + (rank < extra), counts[c] - quotas[c])
            quotas[c] += take
            remaining -= take
        open_classes = [c for c in open_classes if quotas[c] < counts[c]]
    return quotas


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) images resized to size x size with antialiased bilinear filtering."""
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], CHUNK):
        chunk = images[start : start + CHUNK].float()
        scaled = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + CHUNK] = scaled.round().clamp(0, 255).to(torch.uint8)
    return out
