"""Process-level helpers shared by the stages: device, seeding, ranks, progress bars."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from mkdt.errors import ConfigError

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; a cuda device that is absent is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu")
    return device


@dataclass(frozen=True)
class FastPath:
    """Optional speed-ups of the networks' forward passes (``precision``, ``channels_last``,
    ``compile`` in the config); every stage keeps weights, optimizer states, losses and parameter
    updates in float32 whatever is chosen here."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def autocast(self) -> AbstractContextManager[Any]:
        """bfloat16 autocast when ``precision == "bf16"``, otherwise a no-op context."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last layout when enabled (same values)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` moved in place to the channels_last layout when enabled; returns it."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``torch.compile(fn)`` when enabled (fn shares the module's parameters), else ``fn``."""
        return torch.compile(fn) if self.compile else fn


def fast_path(config: Any, device: torch.device) -> FastPath:
    """The config's fast path on ``device``; ``channels_last`` is applied on CUDA only (on CPU it is
    not faster here, and torch 2.14's CPU kernels crashed with it for ResNets of width 4)."""
    return FastPath(device, config.precision, config.channels_last and device.type == "cuda",
                    config.compile)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. module construction) under torch's global RNG seeded with ``seed``,
    restoring the previous RNG state afterwards so no global state leaks between stages."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded torch.Generator on ``device`` (batch orders and augmentation draw from it)."""
    return torch.Generator(device=device).manual_seed(seed)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def progress(items: Iterable[T], *, disable: bool = False, **kwargs: Any) -> Iterable[T]:
    """A tqdm bar on rank 0 only; disabled when MKDT_PROGRESS=0."""
    enabled = rank_and_world()[0] == 0 and os.environ.get("MKDT_PROGRESS", "1") != "0"
    return tqdm(items, disable=disable or not enabled, dynamic_ncols=True, **kwargs)


def load_real(config: Any) -> Any:
    """D_real for a config: the dataset (cached), resized, and the class-balanced pool."""
    from mkdt.artifacts import derive_seed
    from mkdt.data import load_dataset

    d = config.data
    data = load_dataset(d.name, d.root, download=d.download, cache_dir=d.cache_dir,
                        resolution=d.resolution)
    if d.pool_size is not None:
        data = data.subset(d.pool_size, derive_seed(config.seed, "pool"))
    return data


def data_identity(config: Any) -> dict[str, Any]:
    """The config keys that define D_real (the raw files' location does not)."""
    d = config.data
    return {"seed": config.seed, "name": d.name, "resolution": d.resolution,
            "pool_size": d.pool_size}
