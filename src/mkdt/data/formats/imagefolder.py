"""ImageFolder trees (<class>/<image>, or train/<class>/<image> + test/ or val/) as folders or as
tar and zip archives, read in one pass; without a test split 10% of every class is held out."""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mkdt.data.decode import (
    IMAGE_SUFFIXES,
    PROGRESS_DELAY_S,
    arrays_to_splits,
    decode_image,
    read_bytes,
    reason,
)
from mkdt.data.types import Splits
from mkdt.data.walk import walk_tree
from mkdt.errors import DataError
from mkdt.runtime import progress

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")
ARCHIVES = ".tar/.tar.gz/.tar.xz/.tgz/.zip"
LAYOUT = "an ImageFolder tree (<class>/<image>, or train/<class>/<image> + test/<class>/<image>)"
_HOLDOUT_FRACTION = 0.1

_Parts = tuple[str, ...]  # a relative path inside a folder or archive, split at "/"
_Entry = tuple[_Parts, bytes | None]  # an image file's bytes, or None for a folder
_Groups = dict[str, list[_Parts]]  # class name -> image paths


def _visible(part: str) -> bool:
    """False for hidden names and macOS archive debris, which are never dataset content."""
    return not part.startswith(".") and part != "__MACOSX"


def _is_image(parts: _Parts) -> bool:
    """Whether a relative path names a visible image file."""
    return parts[-1].lower().endswith(IMAGE_SUFFIXES) and all(_visible(p) for p in parts)


def _is_archive(path: Path) -> bool:
    """Whether a file name has a supported archive suffix."""
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


def _member_parts(name: str) -> _Parts | None:
    """An archive member's relative path; None for the archive root and hidden entries."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if not parts or not all(_visible(part) for part in parts):
        return None
    return parts


def _wanted(parts: _Parts, is_dir: bool) -> bool:
    """Whether the walk lists a relative path: visible folders and image files."""
    return _visible(parts[-1]) if is_dir else _is_image(parts)


def _dir_entries(root: Path) -> Iterator[_Entry]:
    """Folders and image files under root, in sorted order (links as :func:`walk_tree` follows
    them)."""
    for entry in walk_tree(root, _wanted):
        yield entry.parts, None if entry.is_dir else read_bytes(entry.path)


def _tar_entries(path: Path) -> Iterator[_Entry]:
    """Folders and image files of a (compressed) tar archive, streamed in one pass."""
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DataError(
            f"{path} is not a tar archive (plain, gz, xz or bz2); expected a tar of "
            f"{LAYOUT}: re-create or re-download it"
        ) from err
    try:
        with archive:
            for member in archive:
                rel = _member_parts(member.name)
                if rel is not None and member.isdir():
                    yield rel, None
                elif rel is not None and member.isfile() and _is_image(rel):
                    file = archive.extractfile(member)
                    assert file is not None  # None only for members that are not regular files
                    yield rel, file.read()
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise DataError(
            f"cannot read archive {path} ({reason(err)}); it is truncated or "
            "corrupt: re-create or re-download it"
        ) from err


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
        raise DataError(
            f"cannot read archive {path} ({reason(err)}); expected a valid .zip "
            f"of {LAYOUT}: re-create or re-download it"
        ) from err


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
    for rel, data in progress(
        entries, desc=f"decoding {source.name}", unit="file", leave=False, delay=PROGRESS_DELAY_S
    ):
        if data is None:
            folders.add(rel)
        else:
            images[rel] = decode_image(data, f"{'/'.join(rel)} in {source}")
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
        raise DataError(f"class folder {folder} in {where} has no images; add images or remove the folder")
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
        raise DataError(
            f"{test_name}/ in {where} has class folders missing from train/ "
            f"({', '.join(unknown)}); every class needs training images"
        )
    return train, test


def decode_imagefolder(source: Path | None, resolution: int | None) -> Splits:
    """Decode an ImageFolder folder or archive; the classes are the class folder names, sorted."""
    assert source is not None  # locate_imagefolder never returns None
    images, folders = _read_tree(source)
    if not images:
        raise DataError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) found in {source}; expected {LAYOUT}")
    train, test = _assign(list(images), folders, str(source))
    index = {name: label for label, name in enumerate(train)}
    return arrays_to_splits(
        [(images[p], index[name]) for name, paths in train.items() for p in paths],
        [(images[p], index[name]) for name, paths in test.items() for p in paths],
        tuple(train),
        resolution,
        str(source),
    )


def locate_imagefolder(root: Path | None) -> Path:
    """root itself, if it is a folder or a supported archive."""
    if root is None:
        raise DataError(
            f"the imagefolder dataset needs data.root: point it at {LAYOUT} or a {ARCHIVES} of one"
        )
    if root.is_dir() or (root.is_file() and _is_archive(root)):
        return root
    problem = f"is not a folder or a {ARCHIVES} archive" if root.exists() else "does not exist"
    raise DataError(f"{root} {problem}; point data.root at {LAYOUT} or an archive of one")


def is_split_tree(root: Path) -> bool:
    """Whether root is an archive, or a folder with train/ and test/ (or val/) subfolders."""
    if root.is_file():
        return _is_archive(root)
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())
