"""The registered datasets and `load_dataset`: a name (or a path to an ImageFolder tree/archive)
is resolved to its spec, its files are located (downloaded if asked) and loaded through the
cache."""

from __future__ import annotations

import functools
import hashlib
import os
from functools import partial
from pathlib import Path

from mkdt.data.cache import default_cache_dir, load_cached_or_decode, raw_root
from mkdt.data.decode import reason
from mkdt.data.formats.aircraft import decode_aircraft, download_aircraft, locate_aircraft
from mkdt.data.formats.cifar import CIFAR10, CIFAR100, decode_cifar, download_cifar, locate_cifar
from mkdt.data.formats.cub import decode_cub, locate_cub
from mkdt.data.formats.digits import decode_digits, locate_nothing
from mkdt.data.formats.dogs import decode_dogs, locate_dogs
from mkdt.data.formats.fashion_mnist import decode_fashion, download_fashion, fashion_root, locate_fashion
from mkdt.data.formats.flowers import decode_flowers, download_flowers, locate_flowers
from mkdt.data.formats.imagefolder import ARCHIVES, LAYOUT, decode_imagefolder, locate_imagefolder
from mkdt.data.formats.listed import DECODE_SIZE
from mkdt.data.formats.tinyimagenet import decode_tinyimagenet, download_tinyimagenet, locate_tinyimagenet
from mkdt.data.types import DatasetSpec, ImageData
from mkdt.data.walk import walk_tree
from mkdt.errors import DataError

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "scikit-learn digits: 1,797 8x8 grayscale images, 10 classes, 80/20 stratified split",
        locate_nothing,
        decode_digits,
    ),
    "cifar10": DatasetSpec(
        "CIFAR-10: 50,000 + 10,000 32x32 RGB images, 10 classes",
        partial(locate_cifar, CIFAR10),
        partial(decode_cifar, CIFAR10),
        partial(raw_root, "cifar10"),
        ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        partial(download_cifar, CIFAR10),
    ),
    "cifar100": DatasetSpec(
        "CIFAR-100: 50,000 + 10,000 32x32 RGB images, 100 fine classes",
        partial(locate_cifar, CIFAR100),
        partial(decode_cifar, CIFAR100),
        partial(raw_root, "cifar100"),
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        partial(download_cifar, CIFAR100),
    ),
    "tinyimagenet": DatasetSpec(
        "Tiny ImageNet: 100,000 + 10,000 (val) 64x64 RGB images, 200 classes",
        locate_tinyimagenet,
        decode_tinyimagenet,
        partial(raw_root, "tinyimagenet"),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
        download_tinyimagenet,
    ),
    "fashion-mnist": DatasetSpec(
        "Fashion-MNIST: 60,000 + 10,000 28x28 grayscale images, 10 classes",
        locate_fashion,
        decode_fashion,
        fashion_root,
        None,
        download_fashion,
    ),
    "fgvc-aircraft": DatasetSpec(
        "FGVC-Aircraft 2013b: 6,667 (trainval) + 3,333 images, 100 variants; resized to "
        f"data.resolution ({DECODE_SIZE} if unset)",
        locate_aircraft,
        decode_aircraft,
        partial(raw_root, "fgvc-aircraft"),
        download=download_aircraft,
        resolution=DECODE_SIZE,
    ),
    "cub200": DatasetSpec(
        "CUB-200-2011: 5,994 + 5,794 images, 200 bird species (official split); resized to "
        f"data.resolution ({DECODE_SIZE} if unset)",
        locate_cub,
        decode_cub,
        partial(raw_root, "cub200"),
        resolution=DECODE_SIZE,
    ),
    "stanford-dogs": DatasetSpec(
        "Stanford Dogs: 12,000 + 8,580 images, 120 breeds (official split); resized to "
        f"data.resolution ({DECODE_SIZE} if unset)",
        locate_dogs,
        decode_dogs,
        partial(raw_root, "stanford-dogs"),
        resolution=DECODE_SIZE,
    ),
    "flowers102": DatasetSpec(
        "Oxford Flowers-102: 2,040 (train + val) + 6,149 (test) images, 102 classes; resized to "
        f"data.resolution ({DECODE_SIZE} if unset)",
        locate_flowers,
        decode_flowers,
        partial(raw_root, "flowers102"),
        download=download_flowers,
        resolution=DECODE_SIZE,
    ),
    "imagefolder": DatasetSpec(
        f"any ImageFolder tree or {ARCHIVES} archive (train/ + test/ or val/, else a 10% "
        "stratified test split)",
        locate_imagefolder,
        decode_imagefolder,
    ),
}


@functools.lru_cache(maxsize=8)
def source_identity(name: str, root: str | None) -> dict[str, str] | None:
    """What defines the images of a dataset given by a path (``imagefolder`` with a root, or a path
    as the name): the resolved path and a sha256 over its files' relative names and sizes (an
    archive: its size). None for a registered dataset, which its name defines."""
    resolved, _, path = _resolve(name, root)
    if resolved != "imagefolder" or path is None:
        return None
    if path.is_file():
        listing = str(path.stat().st_size)
    else:
        lines = []
        for entry in walk_tree(path):
            if entry.is_dir:
                continue
            try:
                size = entry.path.stat().st_size
            except OSError:  # a dangling link: decoding skips or reports it
                continue
            lines.append(f"{entry.path.relative_to(path)}\t{size}")
        listing = "\n".join(lines)
    return {"path": str(path), "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def dataset_names() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(DATASETS)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    resolution: int | None = None,
) -> ImageData:
    """Load a registered dataset, or an ImageFolder folder/archive given as `name` (or as `root`
    with name "imagefolder").

    The decoded native-size tensors are cached in <cache_dir>/datasets/ (cache_dir defaults to
    `default_cache_dir()`), keyed by name, source path and the source files' sizes and mtimes.
    `resolution` resizes both splits to resolution x resolution after loading (datasets of
    mixed-size images are decoded at it, or at their spec's resolution when it is None, and
    cached per resolution); `download` fetches missing files where the dataset supports it.
    Raises DataError for any problem with the data, including non-square images without a
    resolution.
    """
    name, spec, root_path = _resolve(name, root)
    resolution = spec.resolution if resolution is None else resolution
    source = _locate(spec, root_path, download)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = (cache.expanduser() / "datasets").resolve()
    data = load_cached_or_decode(name, spec, source, folder, resolution)
    if resolution is not None:
        data = data.resized(resolution)
    height, width = data.train_images.shape[2:]
    if height != width:
        raise DataError(
            f"{name} images are {width}x{height} but MKDT needs square images; pass data.resolution=<pixels>"
        )
    return data


def locate_dataset(name: str, root: str | os.PathLike[str] | None = None) -> Path | None:
    """Where `load_dataset(name, root)` would read the dataset's files (None for datasets that need
    none), found without decoding anything; DataError saying what is missing when they are not
    there."""
    _, spec, root_path = _resolve(name, root)
    return spec.locate(root_path)


def _resolve(name: str, root: str | os.PathLike[str] | None) -> tuple[str, DatasetSpec, Path | None]:
    """Registry name, spec and root for a dataset name or a path to an ImageFolder tree/archive."""
    spec = DATASETS.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(
                f"unknown dataset {name!r}: expected one of "
                f"{', '.join(dataset_names())}, or an existing path to {LAYOUT} "
                f"or a {ARCHIVES} of one; check data.name"
            )
        return "imagefolder", DATASETS["imagefolder"], path.resolve()
    if root is not None:
        return name, spec, Path(root).expanduser().resolve()
    return name, spec, spec.default_root() if spec.default_root else None


def _locate(spec: DatasetSpec, root: Path | None, download: bool) -> Path | None:
    """The spec's source under root, downloaded first if it is missing and `download` is set."""
    try:
        return spec.locate(root)
    except DataError:
        if not download or spec.download is None or root is None:
            raise
    try:
        spec.download(root)
    except Exception as err:  # network, checksum and archive errors come in many types
        raise DataError(
            f"downloading into {root} failed ({reason(err)}); check the network, "
            "or put the files there by hand"
        ) from err
    return spec.locate(root)
