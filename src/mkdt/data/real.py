"""D_real for one process: the dataset loaded once, placed on the device once, normalised once.

Every stage of a run reads the same :class:`RealData`: :mod:`mkdt.pipeline` builds it once and
passes it along, a stage run alone builds its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from mkdt.data.registry import load_dataset
from mkdt.data.types import ImageData
from mkdt.runtime import derive_seed


class DataSource(Protocol):
    """What is read of the data config (:class:`mkdt.config.DataConfig`)."""

    name: str
    root: str | None
    download: bool
    cache_dir: str | None
    resolution: int | None
    pool_size: int | None


@dataclass(frozen=True, eq=False)
class RealData:
    """D_real: ``data`` (uint8 tensors on the CPU; its training split is D_real) and its
    training images on ``device``, as uint8 (:attr:`images`) and normalised (:attr:`inputs`)."""

    data: ImageData
    device: torch.device

    @functools.cached_property
    def images(self) -> torch.Tensor:
        """(N, C, H, W) uint8 training images on the device."""
        return self.data.train_images.to(self.device)

    @functools.cached_property
    def inputs(self) -> torch.Tensor:
        """(N, C, H, W) float32 network inputs on the device: (x / 255 - mean) / std."""
        return self.data.normalize(self.images)

    @property
    def num_train(self) -> int:
        """|D_real|, the number of training images."""
        return self.data.num_train


def load_real(source: DataSource, seed: int, device: torch.device) -> RealData:
    """D_real of a data config: the dataset (cached on disk), resized, and the class-balanced
    pool of ``pool_size`` images drawn from ``derive_seed(seed, "pool")``."""
    data = load_dataset(
        source.name,
        source.root,
        download=source.download,
        cache_dir=source.cache_dir,
        resolution=source.resolution,
    )
    if source.pool_size is not None:
        data = data.subset(source.pool_size, derive_seed(seed, "pool"))
    return RealData(data, device)
