"""Tiny ImageNet (tiny-imagenet-200/: wnids.txt, train/<wnid>/images/, val/images/ and
val/val_annotations.txt), and its download."""

from __future__ import annotations

from pathlib import Path

from mkdt.data.decode import (
    IMAGE_SUFFIXES,
    PROGRESS_DELAY_S,
    REFETCH,
    arrays_to_splits,
    decode_image,
    read_bytes,
)
from mkdt.data.types import Splits
from mkdt.errors import DataError
from mkdt.runtime import progress

_TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_LAYOUT = (
    "tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, "
    "val/images/*.JPEG and val/val_annotations.txt"
)


def locate_tinyimagenet(root: Path | None) -> Path:
    """root/tiny-imagenet-200, or root itself when it holds wnids.txt."""
    assert root is not None  # the spec has a default root
    for candidate in (root / "tiny-imagenet-200", root):
        if (candidate / "wnids.txt").is_file():
            return candidate
    raise DataError(
        f"Tiny ImageNet not found at {root}: expected {_TINY_LAYOUT}; point "
        "data.root at the folder that contains tiny-imagenet-200, or pass "
        "data.download=true"
    )


def _tiny_train(source: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) of every training image, wnid by wnid."""
    items = []
    for label, wnid in enumerate(wnids):
        folder = source / "train" / wnid / "images"
        files = sorted(folder.glob("*")) if folder.is_dir() else []
        images = [file for file in files if file.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"no training images in {folder}: expected {_TINY_LAYOUT}; {REFETCH}")
        items += [(image, label) for image in images]
    return items


def _tiny_val(source: Path, wnids: list[str]) -> list[tuple[Path, int]]:
    """(image path, label) of every validation image listed in val/val_annotations.txt."""
    annotations = source / "val" / "val_annotations.txt"
    index = {wnid: label for label, wnid in enumerate(wnids)}
    lines = read_bytes(annotations).decode("utf-8", "replace").splitlines()
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DataError(
                f"{annotations} line {number} is not <file> TAB <wnid from "
                f"wnids.txt> TAB <box>; the file is corrupt: {REFETCH}"
            )
        items.append((source / "val" / "images" / fields[0], index[fields[1]]))
    if not items:
        raise DataError(f"{annotations} lists no images; the file is corrupt: {REFETCH}")
    return items


def decode_tinyimagenet(source: Path | None, resolution: int | None) -> Splits:
    """Tiny ImageNet decoded as RGB, val as the test split; the classes are the wnids in
    wnids.txt order."""
    assert source is not None  # locate_tinyimagenet never returns None
    text = read_bytes(source / "wnids.txt").decode("utf-8", "replace")
    wnids = [line.strip() for line in text.splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{source / 'wnids.txt'} is empty, expected one wnid per line; {REFETCH}")
    train, test = _tiny_train(source, wnids), _tiny_val(source, wnids)
    decoded = [
        (decode_image(read_bytes(path), str(path), "RGB"), label)
        for path, label in progress(
            train + test, desc="decoding tinyimagenet", unit="img", leave=False, delay=PROGRESS_DELAY_S
        )
    ]
    return arrays_to_splits(
        decoded[: len(train)], decoded[len(train) :], tuple(wnids), resolution, str(source)
    )


def download_tinyimagenet(root: Path) -> None:
    """Fetch and unpack tiny-imagenet-200.zip into root."""
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(_TINY_URL, str(root))
