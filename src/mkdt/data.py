"""Labelled image datasets as uint8 tensors: on-disk format loaders and a decode-once cache.

`load_dataset` finds a dataset's files, decodes them once into uint8 tensors, caches those in a
safetensors file and returns an `ImageData`. Every problem with the user's data (missing,
incomplete or corrupt files, an unknown name) raises `DataError` with a one-line message saying
what was expected and how to fix it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import safe_open

from mkdt.artifacts import save_tensors
from mkdt.errors import DataError
from mkdt.runtime import progress

_CACHE_FORMAT = 1  # bump when decoding changes, so that stale cache files are not reused
_TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_CHUNK = 2048  # images per step when resizing or computing statistics
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")
_ARCHIVES = ".tar/.tar.gz/.tar.xz/.tgz/.zip"
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_LAYOUT = "an ImageFolder tree (<class>/<image>, or train/<class>/<image> + test/<class>/<image>)"
_REFETCH = "delete the folder and pass data.download=true"
_PROGRESS_DELAY_S = 2.0  # decoding bars appear only when decoding is slow, i.e. for big datasets
_HOLDOUT_FRACTION = 0.1
_MIN_STD = 1e-6

Stats = tuple[tuple[float, ...], tuple[float, ...]]
_Parts = tuple[str, ...]  # a relative path inside a folder or archive, split at "/"
_Entry = tuple[_Parts, bytes | None]  # an image file's bytes, or None for a folder
_Groups = dict[str, list[_Parts]]  # class name -> image paths


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
                raise ValueError(f"{split}_images must be (N, C, H, W) uint8, got "
                                 f"{images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be ({images.shape[0]},) int64, got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
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
        return replace(self, train_images=self.train_images[index],
                       train_labels=self.train_labels[index])

    def resized(self, size: int) -> ImageData:
        """Both splits resized to size x size (antialiased bilinear on floats, rounded back to
        uint8). The same size returns self."""
        if self.train_images.shape[2:] == (size, size):
            return self
        if size < 1:
            raise DataError(f"data.resolution must be a positive number of pixels, got {size}")
        return replace(self, train_images=_resize(self.train_images, size),
                       test_images=_resize(self.test_images, size))


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
    published normalisation values (None: computed from the training images).
    """

    description: str
    locate: Callable[[Path | None], Path | None]
    decode: Callable[[Path | None, int | None], Splits]
    default_root: Callable[[], Path] | None = None
    stats: Stats | None = None
    download: Callable[[Path], None] | None = None


def default_cache_dir() -> Path:
    """The cache folder: $MKDT_CACHE if set, else ~/.cache/mkdt."""
    env = os.environ.get("MKDT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mkdt"


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
    `resolution` resizes both splits to resolution x resolution after loading; `download`
    fetches missing files where the dataset supports it. Raises DataError for any problem with
    the data, including non-square images without a resolution.
    """
    name, spec, root_path = _resolve(name, root)
    source = _locate(spec, root_path, download)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = (cache.expanduser() / "datasets").resolve()
    data = _load_cached_or_decode(name, spec, source, folder, resolution)
    if resolution is not None:
        data = data.resized(resolution)
    height, width = data.train_images.shape[2:]
    if height != width:
        raise DataError(f"{name} images are {width}x{height} but MKDT needs square images; "
                        "pass data.resolution=<pixels>")
    return data


def _resolve(
    name: str, root: str | os.PathLike[str] | None
) -> tuple[str, DatasetSpec, Path | None]:
    """Registry name, spec and root for a dataset name or a path to an ImageFolder tree/archive."""
    spec = DATASETS.get(name)
    if spec is None:
        path = Path(name).expanduser()
        if not path.exists():
            raise DataError(f"unknown dataset {name!r}: expected one of "
                            f"{', '.join(dataset_names())}, or an existing path to {_LAYOUT} "
                            f"or a {_ARCHIVES} of one; check data.name")
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
        raise DataError(f"downloading into {root} failed ({_reason(err)}); check the network, "
                        "or put the files there by hand") from err
    return spec.locate(root)


# --- cache ------------------------------------------------------------------------------------


def _load_cached_or_decode(
    name: str, spec: DatasetSpec, source: Path | None, folder: Path, resolution: int | None
) -> ImageData:
    """The dataset from its cache file, or decoded from source and written to the cache.

    Native-size data is cached under a key without resolution; mixed-size ImageFolder trees,
    which can only be decoded at a given resolution, under a key that includes it.
    """
    fingerprint = _fingerprint(source, skip=folder)
    native = folder / f"{name}-{_cache_key(name, source, fingerprint, None)}.safetensors"
    sized = folder / f"{name}-{_cache_key(name, source, fingerprint, resolution)}.safetensors"
    for path in dict.fromkeys((native, sized)):
        if path.exists() and (data := _read_cache(path)) is not None:
            return data
    splits = spec.decode(source, resolution)
    if splits.train_images.shape[0] == 0:
        raise DataError(f"{name} has no training images in {source}; check data.root")
    mean, std = spec.stats or _channel_stats(splits.train_images)
    data = ImageData(name, *splits[:5], mean=mean, std=std)
    _write_cache(sized if splits.resized else native, data)
    return data


def _fingerprint(source: Path | None, skip: Path) -> str:
    """Names, sizes and mtimes of the files in `source` (a file, or a folder whose subfolder
    `skip`, the cache, is left out); contents are not read, so this is cheap."""
    if source is None:
        return ""
    if source.is_file():
        stat = source.stat()
        return f"{stat.st_size}\t{stat.st_mtime_ns}"
    lines = []
    for folder, subdirs, files in os.walk(source, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if Path(folder, d) != skip)
        for file in sorted(files):
            path = Path(folder, file)
            try:
                stat = path.stat()
            except OSError:  # a dangling link: decoding skips or reports it
                continue
            lines.append(f"{path.relative_to(source)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return "\n".join(lines)


def _cache_key(name: str, source: Path | None, fingerprint: str, resolution: int | None) -> str:
    """Short sha256 over everything that determines the decoded tensors."""
    text = json.dumps([_CACHE_FORMAT, name, str(source), resolution, fingerprint])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(path: Path) -> ImageData | None:
    """The ImageData stored at path; an unreadable file is deleted with a warning (-> None)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = json.loads(file.metadata()["mkdt"])
            tensors = {key: file.get_tensor(key) for key in _TENSOR_KEYS}
        return ImageData(name=meta["name"], classes=tuple(meta["classes"]),
                         mean=tuple(meta["mean"]), std=tuple(meta["std"]), **tensors)
    except Exception as err:  # whatever the failure, the file is unusable and gets rebuilt
        warnings.warn(f"dataset cache {path} is unreadable ({_reason(err)}); deleting it and "
                      "decoding the dataset again", stacklevel=4)
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, data: ImageData) -> None:
    """Write data to path atomically; a failure to write only warns."""
    meta = {"name": data.name, "classes": list(data.classes),
            "mean": list(data.mean), "std": list(data.std)}
    try:
        save_tensors(path, {key: getattr(data, key) for key in _TENSOR_KEYS}, meta)
    except OSError as err:
        warnings.warn(f"cannot write dataset cache {path} ({_reason(err)}); continuing without it",
                      stacklevel=4)


# --- tensor helpers ---------------------------------------------------------------------------


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
    for start in range(0, images.shape[0], _CHUNK):
        chunk = images[start:start + _CHUNK].float()
        scaled = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
        out[start:start + _CHUNK] = scaled.round().clamp(0, 255).to(torch.uint8)
    return out


def _channel_stats(images: torch.Tensor) -> Stats:
    """Per-channel mean and std of uint8 images in [0, 1] units (exact int64 sums, then
    float64); a zero std is raised to a tiny value so that normalising stays finite."""
    total = torch.zeros(images.shape[1], dtype=torch.int64)
    squares = torch.zeros(images.shape[1], dtype=torch.int64)
    for chunk in images.split(_CHUNK):
        wide = chunk.to(torch.int64)
        total += wide.sum(dim=(0, 2, 3))
        squares += (wide * wide).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total.double() / (count * 255)
    var = squares.double() / (count * 255**2) - mean**2
    std = var.clamp_min(0).sqrt().clamp_min(_MIN_STD)
    return tuple(mean.tolist()), tuple(std.tolist())


def _labels(values: Any) -> torch.Tensor:
    """Labels as an int64 tensor."""
    return torch.as_tensor(np.asarray(values, dtype=np.int64))


# --- image decoding ---------------------------------------------------------------------------


def _decode_image(data: bytes, where: str, mode: str | None = None) -> np.ndarray:
    """Image bytes -> (H, W) grayscale or (H, W, 3) RGB uint8 array (or converted to `mode`)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = mode or ("L" if image.mode in _GRAY_MODES else "RGB")
            return np.asarray(image if image.mode == target else image.convert(target))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot decode image {where} ({_reason(err)}); the file is corrupt: "
                        "replace or delete it") from err


def _pil_resize(array: np.ndarray, size: int) -> np.ndarray:
    """One decoded image resized to size x size with Pillow's (antialiased) bilinear filter."""
    return np.asarray(Image.fromarray(array).resize((size, size), Image.Resampling.BILINEAR))


def _to_tensor(arrays: list[np.ndarray], channels: int, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) or (H, W, 3) arrays stacked into an (N, channels, H, W) uint8 tensor; grayscale
    images are repeated over the channels."""
    batch = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, array in enumerate(arrays):
        batch[i] = array if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(batch)


def _arrays_to_splits(
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
            raise DataError(f"images in {where} have different sizes (e.g. {w1}x{h1} and "
                            f"{w2}x{h2}); pass data.resolution=<pixels> to resize every image "
                            "while loading")
        train = [(_pil_resize(array, resolution), label) for array, label in train]
        test = [(_pil_resize(array, resolution), label) for array, label in test]
        size = (resolution, resolution)
    else:
        size = sizes.pop()
    channels = 3 if any(array.ndim == 3 for array, _ in train + test) else 1
    return Splits(
        _to_tensor([array for array, _ in train], channels, size),
        _labels([label for _, label in train]),
        _to_tensor([array for array, _ in test], channels, size),
        _labels([label for _, label in test]),
        classes,
        resized,
    )


def _reason(err: BaseException) -> str:
    """An exception's message on one line, at most ~200 characters, for DataError messages."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _read_bytes(path: Path) -> bytes:
    """A file's contents, or DataError naming the file."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or _reason(err)}); check that the "
                        "dataset is complete") from err


# --- ImageFolder trees and archives -----------------------------------------------------------


def _visible(part: str) -> bool:
    """False for hidden names and macOS archive debris, which are never dataset content."""
    return not part.startswith(".") and part != "__MACOSX"


def _is_image(parts: _Parts) -> bool:
    """Whether a relative path names a visible image file."""
    return parts[-1].lower().endswith(_IMAGE_SUFFIXES) and all(_visible(p) for p in parts)


def _is_archive(path: Path) -> bool:
    """Whether a file name has a supported archive suffix."""
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _member_parts(name: str) -> _Parts | None:
    """An archive member's relative path; None for the archive root and hidden entries."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if not parts or not all(_visible(part) for part in parts):
        return None
    return parts


def _dir_entries(root: Path) -> Iterator[_Entry]:
    """Folders and image files under root, in sorted order."""
    for folder, subdirs, files in os.walk(root, followlinks=True):
        here = Path(folder).relative_to(root).parts
        subdirs[:] = sorted(d for d in subdirs if _visible(d))
        for subdir in subdirs:
            yield (*here, subdir), None
        for file in sorted(files):
            if _is_image((*here, file)):
                yield (*here, file), _read_bytes(Path(folder, file))


def _tar_entries(path: Path) -> Iterator[_Entry]:
    """Folders and image files of a (compressed) tar archive, streamed in one pass."""
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path} is not a tar archive (plain, gz, xz or bz2); expected a tar of "
                        f"{_LAYOUT}: re-create or re-download it") from err
    try:
        with archive:
            for member in archive:
                rel = _member_parts(member.name)
                if rel is not None and member.isdir():
                    yield rel, None
                elif rel is not None and member.isfile() and _is_image(rel):
                    yield rel, archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise DataError(f"cannot read archive {path} ({_reason(err)}); it is truncated or "
                        "corrupt: re-create or re-download it") from err


def _zip_entries(path: Path) -> Iterator[_Entry]:
    """Folders and image files of a zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                rel = _member_parts(info.filename)
                if rel is not None and info.is_dir():
                    yield rel, None
                elif rel is not None and _is_image(rel):
                    yield rel, archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read archive {path} ({_reason(err)}); expected a valid .zip "
                        f"of {_LAYOUT}: re-create or re-download it") from err


def _read_tree(source: Path) -> tuple[dict[_Parts, np.ndarray], set[_Parts]]:
    """Every image of an ImageFolder folder or archive decoded, by relative path, and the
    folders seen (archives are read in one streaming pass)."""
    if source.is_dir():
        entries = _dir_entries(source)
    elif source.name.lower().endswith(".zip"):
        entries = _zip_entries(source)
    else:
        entries = _tar_entries(source)
    images: dict[_Parts, np.ndarray] = {}
    folders: set[_Parts] = set()
    for rel, data in progress(entries, desc=f"decoding {source.name}", unit="file", leave=False,
                              delay=_PROGRESS_DELAY_S):
        if data is None:
            folders.add(rel)
        else:
            images[rel] = _decode_image(data, f"{'/'.join(rel)} in {source}")
    return images, folders


def _prefix_depth(paths: list[_Parts]) -> int:
    """How many leading folders all image paths share and can drop, keeping <class>/<file>."""
    depth = 0
    first = paths[0]
    while all(len(p) >= depth + 3 and p[depth] == first[depth] for p in paths):
        depth += 1
    return depth


def _group(paths: list[_Parts], folders: set[_Parts], base: _Parts, where: str) -> _Groups:
    """Image paths under base/<class>/..., by class name (both sorted); an empty class folder
    raises DataError."""
    n = len(base)
    groups: _Groups = {f[n]: [] for f in folders if len(f) == n + 1 and f[:n] == base}
    for path in paths:
        if len(path) >= n + 2 and path[:n] == base:
            groups.setdefault(path[n], []).append(path)
    empty = sorted(name for name, members in groups.items() if not members)
    if empty:
        folder = "/".join((*base, empty[0]))
        raise DataError(f"class folder {folder} in {where} has no images; add images or remove "
                        "the folder")
    return {name: sorted(groups[name]) for name in sorted(groups)}


def _holdout(train: _Groups) -> tuple[_Groups, _Groups]:
    """(train, test): a deterministic 10% of every class (at least one image of classes with
    two or more) moved to test."""
    generator = torch.Generator().manual_seed(0)
    kept: _Groups = {}
    held: _Groups = {}
    for name, paths in train.items():
        n_test = max(1, round(len(paths) * _HOLDOUT_FRACTION)) if len(paths) > 1 else 0
        order = torch.randperm(len(paths), generator=generator).tolist()
        held[name] = sorted(paths[i] for i in order[:n_test])
        kept[name] = sorted(paths[i] for i in order[n_test:])
    return kept, held


def _assign(paths: list[_Parts], folders: set[_Parts], where: str) -> tuple[_Groups, _Groups]:
    """Image paths split into train and test {class: paths}: by the train/ and test/ (or val/)
    folders if present, else by holding out 10% of every class. A shared top folder is
    ignored."""
    depth = _prefix_depth(paths)
    prefix = paths[0][:depth]
    tops = {p[depth] for p in [*paths, *folders] if len(p) > depth and p[:depth] == prefix}
    test_name = next((name for name in ("test", "val") if name in tops), None)
    if "train" not in tops or test_name is None:
        return _holdout(_group(paths, folders, prefix, where))
    train = _group(paths, folders, (*prefix, "train"), where)
    test = _group(paths, folders, (*prefix, test_name), where)
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise DataError(f"{test_name}/ in {where} has class folders missing from train/ "
                        f"({', '.join(unknown)}); every class needs training images")
    return train, test


def _decode_imagefolder(source: Path | None, resolution: int | None) -> Splits:
    """Decode an ImageFolder folder or archive; the classes are the class folder names, sorted."""
    assert source is not None  # _locate_imagefolder never returns None
    images, folders = _read_tree(source)
    if not images:
        raise DataError(f"no images ({'/'.join(_IMAGE_SUFFIXES)}) found in {source}; "
                        f"expected {_LAYOUT}")
    train, test = _assign(list(images), folders, str(source))
    index = {name: label for label, name in enumerate(train)}
    return _arrays_to_splits(
        [(images[p], index[name]) for name, paths in train.items() for p in paths],
        [(images[p], index[name]) for name, paths in test.items() for p in paths],
        tuple(train),
        resolution,
        str(source),
    )


def _locate_imagefolder(root: Path | None) -> Path:
    """root itself, if it is a folder or a supported archive."""
    if root is None:
        raise DataError(f"the imagefolder dataset needs data.root: point it at {_LAYOUT} "
                        f"or a {_ARCHIVES} of one")
    if root.is_dir() or (root.is_file() and _is_archive(root)):
        return root
    problem = f"is not a folder or a {_ARCHIVES} archive" if root.exists() else "does not exist"
    raise DataError(f"{root} {problem}; point data.root at {_LAYOUT} or an archive of one")


def _raw_root(name: str) -> Path:
    """Default download folder: $MKDT_DATA/<name> if MKDT_DATA is set, else
    <default_cache_dir()>/raw/<name>."""
    env = os.environ.get("MKDT_DATA")
    return Path(env).expanduser() / name if env else default_cache_dir() / "raw" / name


def _is_split_tree(root: Path) -> bool:
    """Whether root is an archive, or a folder with train/ and test/ (or val/) subfolders."""
    if root.is_file():
        return _is_archive(root)
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())


# --- digits (scikit-learn) --------------------------------------------------------------------


def _locate_nothing(root: Path | None) -> None:
    """Datasets that ship with a library need no files."""
    return None


def _decode_digits(source: Path | None, resolution: int | None) -> Splits:
    """scikit-learn's 8x8 digits scaled to 0..255, split 80/20 stratified with seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(np.rint(digits.images * 255 / 16).astype(np.uint8)[:, None])
    labels = _labels(digits.target)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2,
                                   stratify=digits.target, random_state=0)
    train, test = torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(test))
    classes = tuple(str(digit) for digit in range(10))
    return Splits(images[train], labels[train], images[test], labels[test], classes)


# --- CIFAR-10 / CIFAR-100 (torchvision's python pickle format) --------------------------------


class _CifarFormat(NamedTuple):
    """File names and keys of one CIFAR variant in the python format."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str


_CIFAR10 = _CifarFormat("CIFAR-10", "cifar-10-batches-py",
                        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                        "batches.meta", "labels", "label_names")
_CIFAR100 = _CifarFormat("CIFAR-100", "cifar-100-python", ("train",), "test", "meta",
                         "fine_labels", "fine_label_names")


def _cifar_files(fmt: _CifarFormat) -> str:
    """The files of a CIFAR folder, for messages."""
    return ", ".join((*fmt.train_files, fmt.test_file, fmt.meta_file))


def _locate_cifar(fmt: _CifarFormat, root: Path | None) -> Path:
    """The pickle folder (root/<folder>, or root itself), else root if it is an ImageFolder
    tree with train/ and test/ or an archive."""
    assert root is not None  # the CIFAR specs have a default root
    for candidate in (root / fmt.folder, root):
        if (candidate / fmt.meta_file).is_file():
            return candidate
    if _is_split_tree(root):
        return root
    raise DataError(f"{fmt.title} not found at {root}: expected {root}/{fmt.folder}/ "
                    f"({_cifar_files(fmt)}) or an ImageFolder folder/archive with train/ and "
                    f"test/; point data.root at the folder that contains {fmt.folder}, "
                    "or pass data.download=true")


def _unpickle(path: Path, fmt: _CifarFormat) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the originals are Python 2 pickles). Pickles can
    run code: only load files from a trusted source."""
    if not path.is_file():
        raise DataError(f"missing {path}: {fmt.title} needs {_cifar_files(fmt)} in "
                        f"{path.parent}; {_REFETCH}")
    try:
        with path.open("rb") as file:
            content = pickle.load(file, encoding="latin1")
    except Exception as err:  # truncated or foreign pickles fail in many ways
        raise DataError(f"cannot unpickle {path} ({type(err).__name__}: {_reason(err)}); the "
                        f"file is corrupt: {_REFETCH}") from err
    if not isinstance(content, dict):
        raise DataError(f"{path} does not hold a {fmt.title} dict; {_REFETCH}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}


def _cifar_batch(path: Path, fmt: _CifarFormat, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Images (N, 3, 32, 32) and labels (N,) of one CIFAR batch file, validated."""
    batch = _unpickle(path, fmt)
    if "data" not in batch or fmt.label_key not in batch:
        raise DataError(f"{path} lacks the 'data' or '{fmt.label_key}' entry of a {fmt.title} "
                        f"batch; {_REFETCH}")
    data, labels = np.asarray(batch["data"]), np.asarray(batch[fmt.label_key])
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
            or labels.shape != data.shape[:1]):
        raise DataError(f"{path} holds data {data.dtype} {data.shape} and labels {labels.shape}, "
                        f"expected uint8 (N, 3072) and (N,); the file is corrupt: {_REFETCH}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path} has labels outside 0..{num_classes - 1}; the file is corrupt: "
                        f"{_REFETCH}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), _labels(labels)


def _decode_cifar(fmt: _CifarFormat, source: Path | None, resolution: int | None) -> Splits:
    """The CIFAR pickles in source, or source decoded as an ImageFolder tree/archive."""
    assert source is not None  # _locate_cifar never returns None
    if not (source / fmt.meta_file).is_file():
        return _decode_imagefolder(source, resolution)
    names = _unpickle(source / fmt.meta_file, fmt).get(fmt.names_key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{source / fmt.meta_file} lacks '{fmt.names_key}'; {_REFETCH}")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    train = [_cifar_batch(source / file, fmt, len(classes)) for file in fmt.train_files]
    test_images, test_labels = _cifar_batch(source / fmt.test_file, fmt, len(classes))
    return Splits(torch.cat([images for images, _ in train]),
                  torch.cat([labels for _, labels in train]), test_images, test_labels, classes)


def _download_cifar(fmt: _CifarFormat, root: Path) -> None:
    """Fetch a CIFAR variant with torchvision into root/<folder>."""
    from torchvision import datasets

    (datasets.CIFAR10 if fmt is _CIFAR10 else datasets.CIFAR100)(str(root), download=True)


# --- Tiny ImageNet ----------------------------------------------------------------------------


_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
                "val/images/*.JPEG and val/val_annotations.txt")


def _locate_tinyimagenet(root: Path | None) -> Path:
    """root/tiny-imagenet-200, or root itself when it holds wnids.txt."""
    assert root is not None  # the spec has a default root
    for candidate in (root / "tiny-imagenet-200", root):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise DataError(f"Tiny ImageNet not found at {root}: expected {_TINY_LAYOUT}; point "
                    "data.root at the folder that contains tiny-imagenet-200, or pass "
                    "data.download=true")


def _tiny_train(source: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) of every training image, wnid by wnid."""
    items = []
    for label, wnid in enumerate(wnids):
        folder = source / "train" / wnid / "images"
        files = sorted(folder.glob("*")) if folder.is_dir() else []
        images = [file for file in files if file.suffix.lower() in _IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"no training images in {folder}: expected {_TINY_LAYOUT}; "
                            f"{_REFETCH}")
        items += [(image, label) for image in images]
    return items


def _tiny_val(source: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) of every validation image listed in val/val_annotations.txt."""
    annotations = source / "val" / "val_annotations.txt"
    index = {wnid: label for label, wnid in enumerate(wnids)}
    lines = _read_bytes(annotations).decode("utf-8", "replace").splitlines()
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(f"{annotations} line {number} is not <file> TAB <wnid from "
                            f"wnids.txt> TAB <box>; the file is corrupt: {_REFETCH}")
        items.append((source / "val" / "images" / fields[0], index[fields[1]]))
    if not items:
        raise DataError(f"{annotations} lists no images; the file is corrupt: {_REFETCH}")
    return items


def _decode_tinyimagenet(source: Path | None, resolution: int | None) -> Splits:
    """Tiny ImageNet decoded as RGB, val as the test split; the classes are the wnids in
    wnids.txt order."""
    assert source is not None  # _locate_tinyimagenet never returns None
    text = _read_bytes(source / "wnids.txt").decode("utf-8", "replace")
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{source / 'wnids.txt'} is empty, expected one wnid per line; "
                        f"{_REFETCH}")
    train, test = _tiny_train(source, wnids), _tiny_val(source, wnids)
    decoded = [(_decode_image(_read_bytes(path), str(path), "RGB"), label)
               for path, label in progress(train + test, desc="decoding tinyimagenet",
                                           unit="img", leave=False, delay=_PROGRESS_DELAY_S)]
    return _arrays_to_splits(decoded[:len(train)], decoded[len(train):], tuple(wnids),
                             resolution, str(source))


def _download_tinyimagenet(root: Path) -> None:
    """Fetch and unpack tiny-imagenet-200.zip into root."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(_TINY_URL, str(root))


# --- Fashion-MNIST (idx format) ---------------------------------------------------------------


_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def _fashion_root() -> Path:
    """The Debian package's folder if installed, else the default download folder."""
    return _DEBIAN_FASHION if _DEBIAN_FASHION.is_dir() else _raw_root("fashion-mnist")


def _locate_fashion(root: Path | None) -> Path:
    """The folder with the idx files: root itself, or torchvision's root/FashionMNIST/raw."""
    assert root is not None  # the spec has a default root
    for candidate in (root, root / "FashionMNIST" / "raw"):
        if any((candidate / f"{_FASHION_FILES[0]}{ext}").is_file() for ext in ("", ".gz")):
            return candidate
    raise DataError(f"Fashion-MNIST not found at {root}: expected {', '.join(_FASHION_FILES)} "
                    "(each optionally .gz); install the Debian package dataset-fashion-mnist, "
                    "point data.root at the folder with these files, or pass data.download=true")


def _read_idx(folder: Path, stem: str, magic: int) -> np.ndarray:
    """The array in folder/stem or folder/stem.gz, checked against its idx header."""
    path = next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)
    if path is None:
        raise DataError(f"missing {folder / stem} (or .gz): Fashion-MNIST needs "
                        f"{', '.join(_FASHION_FILES)}; pass data.download=true")
    raw = _read_bytes(path)
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"cannot decompress {path} ({_reason(err)}); the file is corrupt: "
                            "re-download it") from err
    return _parse_idx(raw, magic, path)


def _parse_idx(raw: bytes, magic: int, path: Path) -> np.ndarray:
    """An idx array of unsigned bytes: big-endian magic number and dimensions, then the data."""
    found = int.from_bytes(raw[:4], "big")
    if len(raw) < 4 or found != magic:
        raise DataError(f"{path} has idx magic number {found}, expected {magic}; it is not the "
                        "right Fashion-MNIST file: re-download it")
    header = 4 + 4 * raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else ()
    if len(raw) < header or len(raw) - header != int(np.prod(dims)):
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {dims} but "
                        f"{len(raw) - header} data bytes follow; re-download it")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _fashion_split(folder: Path, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) and labels of the train or t10k files, checked against each other."""
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0] or (labels.size and labels.max() > 9):
        raise DataError(f"the {prefix} files in {folder} hold {images.shape[0]} images and "
                        f"{labels.shape[0]} labels up to {labels.max(initial=0)}, expected as many "
                        "labels as images, in 0..9; re-download them")
    return torch.from_numpy(images[:, None].copy()), _labels(labels)


def _decode_fashion(source: Path | None, resolution: int | None) -> Splits:
    """The four Fashion-MNIST idx files in source."""
    assert source is not None  # _locate_fashion never returns None
    train_images, train_labels = _fashion_split(source, "train")
    test_images, test_labels = _fashion_split(source, "t10k")
    return Splits(train_images, train_labels, test_images, test_labels, _FASHION_CLASSES)


def _download_fashion(root: Path) -> None:
    """Fetch Fashion-MNIST with torchvision into root/FashionMNIST/raw."""
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), download=True)


# --- registry ---------------------------------------------------------------------------------


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        "scikit-learn digits: 1,797 8x8 grayscale images, 10 classes, 80/20 stratified split",
        _locate_nothing,
        _decode_digits,
    ),
    "cifar10": DatasetSpec(
        "CIFAR-10: 50,000 + 10,000 32x32 RGB images, 10 classes",
        partial(_locate_cifar, _CIFAR10),
        partial(_decode_cifar, _CIFAR10),
        partial(_raw_root, "cifar10"),
        ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        partial(_download_cifar, _CIFAR10),
    ),
    "cifar100": DatasetSpec(
        "CIFAR-100: 50,000 + 10,000 32x32 RGB images, 100 fine classes",
        partial(_locate_cifar, _CIFAR100),
        partial(_decode_cifar, _CIFAR100),
        partial(_raw_root, "cifar100"),
        ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        partial(_download_cifar, _CIFAR100),
    ),
    "tinyimagenet": DatasetSpec(
        "Tiny ImageNet: 100,000 + 10,000 (val) 64x64 RGB images, 200 classes",
        _locate_tinyimagenet,
        _decode_tinyimagenet,
        partial(_raw_root, "tinyimagenet"),
        ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet's
        _download_tinyimagenet,
    ),
    "fashion-mnist": DatasetSpec(
        "Fashion-MNIST: 60,000 + 10,000 28x28 grayscale images, 10 classes",
        _locate_fashion,
        _decode_fashion,
        _fashion_root,
        None,
        _download_fashion,
    ),
    "imagefolder": DatasetSpec(
        f"any ImageFolder tree or {_ARCHIVES} archive (train/ + test/ or val/, else a 10% "
        "stratified test split)",
        _locate_imagefolder,
        _decode_imagefolder,
    ),
}
