"""The decode-once cache: decoded native-size tensors in a safetensors file under
<cache_dir>/datasets/, keyed by dataset name, source path and the source files' sizes and mtimes;
and the default cache and download folders."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from safetensors.torch import safe_open

from mkdt.data.decode import channel_stats, reason
from mkdt.data.types import DatasetSpec, ImageData
from mkdt.data.walk import walk_tree
from mkdt.errors import DataError, MkdtError
from mkdt.files import save_tensors

_CACHE_FORMAT = 1  # bump when decoding changes, so that stale cache files are not reused
_TENSOR_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def default_cache_dir() -> Path:
    """The cache folder: $MKDT_CACHE if set, else ~/.cache/mkdt."""
    env = os.environ.get("MKDT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mkdt"


def raw_root(name: str) -> Path:
    """Default download folder: $MKDT_DATA/<name> if MKDT_DATA is set, else
    <default_cache_dir()>/raw/<name>."""
    env = os.environ.get("MKDT_DATA")
    return Path(env).expanduser() / name if env else default_cache_dir() / "raw" / name


def load_cached_or_decode(
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
    mean, std = spec.stats or channel_stats(splits.train_images)
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
    for entry in walk_tree(source, lambda parts, _is_dir: source.joinpath(*parts) != skip):
        if entry.is_dir:
            continue
        try:
            stat = entry.path.stat()
        except OSError:  # a dangling link: decoding skips or reports it
            continue
        lines.append(f"{entry.path.relative_to(source)}\t{stat.st_size}\t{stat.st_mtime_ns}")
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
        return ImageData(
            name=meta["name"],
            classes=tuple(meta["classes"]),
            mean=tuple(meta["mean"]),
            std=tuple(meta["std"]),
            **tensors,
        )
    except Exception as err:  # whatever the failure, the file is unusable and gets rebuilt
        warnings.warn(
            f"dataset cache {path} is unreadable ({reason(err)}); deleting it and decoding the dataset again",
            stacklevel=4,
        )
        path.unlink(missing_ok=True)
        return None


def _write_cache(path: Path, data: ImageData) -> None:
    """Write data to path atomically; a failure to write only warns."""
    meta = {"name": data.name, "classes": list(data.classes), "mean": list(data.mean), "std": list(data.std)}
    try:
        save_tensors(path, {key: getattr(data, key) for key in _TENSOR_KEYS}, meta)
    except (OSError, MkdtError) as err:  # a full disk or a read-only cache: the cache is optional
        warnings.warn(
            f"cannot write dataset cache {path} ({_cause(err)}); continuing without it: point "
            "data.cache_dir (or $MKDT_CACHE) at a writable folder with free space to keep the decoded "
            "dataset",
            stacklevel=4,
        )


def _cause(err: BaseException) -> str:
    """What went wrong in a failed cache write: the words of the error underneath, without the
    advice about --out that a failed artifact write adds, which is wrong for the cache."""
    cause = err if isinstance(err, OSError) else (err.__context__ or err)
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return reason(cause)
