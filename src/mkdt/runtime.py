"""The process's runtime: where and how the networks run, random streams, ranks, progress bars.

Every training loop (the SSL teacher, KD students, trajectory matching, evaluation pre-training)
receives one :class:`Runtime` and applies it the same way: ``runtime.prepare(model)`` once,
``runtime.images(x)`` on its input batches, the forward pass under ``runtime.autocast()``.
Weights, optimizer states, losses and parameter updates stay float32 whatever is chosen here.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from mkdt.errors import ConfigError

T = TypeVar("T")
PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; a cuda device that is absent is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu")
    return device


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@dataclass(frozen=True)
class Runtime:
    """Device, speed options and rank of this process (config keys ``device``, ``precision``,
    ``channels_last``, ``compile``; ``RANK``/``WORLD_SIZE`` from torchrun).

    ``precision="bf16"`` runs forward passes under bfloat16 autocast; ``channels_last`` lays
    images and convolution weights out channels-last; ``compile`` wraps forward functions in
    ``torch.compile``.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    rank: int = 0
    world: int = 1

    @classmethod
    def create(
        cls, device: str = "auto", precision: str = "fp32", channels_last: bool = False, compile: bool = False
    ) -> Runtime:
        """The runtime for these settings in this process. ``channels_last`` applies on CUDA only
        (on CPU it is not faster here, and torch 2.14's CPU kernels crashed with it for ResNets
        of width 4)."""
        dev = resolve_device(device)
        rank, world = rank_and_world()
        if dev.type == "cuda" and dev.index is None and world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and "MASTER_ADDR" in os.environ and not dist.is_initialized():
            # torchrun's environment: one process group for the whole process (NCCL on GPUs)
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(dev, precision, channels_last and dev.type == "cuda", compile, rank, world)

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

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes shared records and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when this process is one of several ranks of an initialised process group."""
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        """Wait until every rank gets here (a no-op in a single process)."""
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (unchanged in a single process)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
        if not self.distributed:
            return [obj]
        found: list[Any] = [None] * self.world
        dist.all_gather_object(found, obj)
        return found


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (e.g. module construction) under torch's global RNG seeded with ``seed``,
    restoring the previous RNG state afterwards so no global state leaks between stages."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one random stream, e.g. ``derive_seed(seed, "expert", 3)``."""
    text = "/".join(str(n) for n in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, device: torch.device) -> torch.Generator:
    """A seeded torch.Generator on ``device`` (batch orders and augmentation draw from it)."""
    return torch.Generator(device=device).manual_seed(seed)


class LineProgress(tqdm):
    """tqdm for logs: each refresh is one plain line (no carriage-return redraws), at most every
    ``mininterval`` seconds, plus the final state when the loop ends; a refresh with no new
    count and no new postfix (tqdm's periodic redraw of a stalled bar) prints nothing."""

    _last_line = -math.inf
    _last_state: tuple[float, str | None] | None = None
    disable: bool

    def display(self, msg: str | None = None, pos: int | None = None, force: bool = False) -> None:
        now = time.monotonic()
        state = (self.n, self.postfix)
        if self.disable or state == self._last_state or not (force or now - self._last_line >= LOG_INTERVAL):
            return
        self._last_line, self._last_state = now, state
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()

    def close(self) -> None:
        if not self.disable:
            self.display(force=True)
            self.disable = True  # tqdm's own close would redraw the bar
        super().close()


LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


def progress(items: Iterable[T], *, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar over ``items`` on rank 0 only (iterate it; ``set_postfix`` shows values);
    disabled when MKDT_PROGRESS=0. When stderr is not a terminal (CI logs, ``mkdt run > log
    2>&1``) it prints a plain line every LOG_INTERVAL seconds and one at the end instead."""
    enabled = rank_and_world()[0] == 0 and os.environ.get("MKDT_PROGRESS", "1") != "0"
    if sys.stderr.isatty():
        return tqdm(items, disable=disable or not enabled, dynamic_ncols=True, **kwargs)
    kwargs.pop("leave", None)
    return LineProgress(
        items, disable=disable or not enabled, mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, **kwargs
    )
