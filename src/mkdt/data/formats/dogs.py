"""Stanford Dogs (Images/<synset-breed>/<file>.jpg with train_list.mat and test_list.mat from
lists.tar beside it: MATLAB files with the cell array `file_list` of paths relative to Images/
and the 1-based `labels`). mkdt cannot download it."""

from __future__ import annotations

from pathlib import Path

from mkdt.data.formats.listed import DAMAGED, Item, decode_listed, read_mat, whole_numbers
from mkdt.data.types import Splits
from mkdt.errors import DataError

_DOGS_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/"

_Listed = tuple[str, int, Path]  # a path relative to Images/, its 1-based label, its list file


def locate_dogs(root: Path | None) -> Path:
    """root itself, when it holds Images/."""
    assert root is not None  # the spec has a default root
    if (root / "Images").is_dir():
        return root
    raise DataError(
        f"Stanford Dogs not found at {root}: expected Images/<synset-breed>/<file>.jpg with "
        "train_list.mat and test_list.mat beside it; mkdt cannot download it: get images.tar and "
        f"lists.tar from {_DOGS_URL}, unpack both into one folder and point data.root at it"
    )


def _dogs_list(source: Path, split: str) -> list[_Listed]:
    """The entries of <split>_list.mat."""
    path = source / f"{split}_list.mat"
    files, labels = read_mat(path, ("file_list", "labels"))
    if len(files) != len(labels) or not all(isinstance(file, str) for file in files):
        raise DataError(
            f"{path} must hold as many labels as paths in file_list ({len(labels)} and {len(files)} "
            f"found); {DAMAGED}"
        )
    numbers = whole_numbers(labels, path, "labels")
    return [(file, label, path) for file, label in zip(files, numbers, strict=True)]


def _dogs_classes(entries: list[_Listed]) -> tuple[str, ...]:
    """The breed folder of each label 1..K; a label given to two folders, or a missing label,
    raises DataError."""
    folders: dict[int, str] = {}
    for file, label, path in entries:
        folder = file.split("/")[0]
        if folders.setdefault(label, folder) != folder:
            raise DataError(
                f"{path} gives label {label} to images of {folders[label]} and of {folder}; {DAMAGED}"
            )
    missing = sorted(set(range(1, max(folders) + 1)) - set(folders))
    if missing:
        raise DataError(
            f"no image in train_list.mat or test_list.mat has label {missing[0]}, expected labels "
            f"1..{max(folders)}; {DAMAGED}"
        )
    return tuple(folders[label] for label in range(1, max(folders) + 1))


def decode_dogs(source: Path | None, resolution: int | None) -> Splits:
    """The official split (train_list.mat: 12,000 training images, test_list.mat: 8,580 test
    images); the classes are the breed folders (n02085620-Chihuahua, ...) in label order."""
    assert source is not None  # locate_dogs never returns None
    train, test = _dogs_list(source, "train"), _dogs_list(source, "test")
    classes = _dogs_classes(train + test)

    def items(entries: list[_Listed]) -> list[Item]:
        return [(source / "Images" / file, label - 1) for file, label, _ in entries]

    return decode_listed("stanford-dogs", items(train), items(test), classes, resolution, source)
