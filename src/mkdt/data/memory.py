"""A memory estimate before decoding or resizing allocates: a size that cannot fit (e.g.
``data.resolution=100000``, terabytes of pixels) is refused in one line instead of being tried."""

from __future__ import annotations

import os
from pathlib import Path

from mkdt.errors import DataError

CHUNK = 2048  # images per step when resizing or computing statistics
_MEMINFO = Path("/proc/meminfo")


def available_bytes() -> int | None:
    """Memory that can be allocated now without swapping: Linux's MemAvailable, else the free
    physical pages (os.sysconf); None where neither is known."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps a number >= 1 (e.g. '13.0 TiB')."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{nbytes:.0f} B"
        nbytes /= 1024
    return f"{nbytes:,.1f} TiB"


def check_memory(images: int, channels: int, size: int, what: str) -> None:
    """DataError when ``images`` uint8 images of ``channels`` x ``size`` x ``size`` pixels and a
    float32 copy of up to CHUNK of them (a resize's working chunk), a lower bound of what decoding
    or resizing them allocates, need more memory than is available now; ``what`` names the images
    in the message (e.g. 'digits at data.resolution=100000')."""
    pixels = channels * size * size
    needed = images * pixels + min(images, CHUNK) * pixels * 4
    available = available_bytes()
    if available is not None and needed > available:
        raise DataError(
            f"{what} needs at least {_size(needed)} of memory ({images} images of {channels}x{size}x{size} "
            f"pixels) but {_size(available)} is available; choose a smaller data.resolution"
        )
