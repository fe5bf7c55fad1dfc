"""Oxford Flowers-102 (flowers-102/: jpg/image_<NNNNN>.jpg, imagelabels.mat with the 1-based
`labels` of every image, setid.mat with the 1-based image numbers `trnid`, `valid` and `tstid`),
and its download with torchvision."""

from __future__ import annotations

from pathlib import Path

from mkdt.data.formats.listed import Item, decode_listed, read_mat, whole_numbers
from mkdt.data.types import Splits
from mkdt.errors import DataError

_SPLIT_KEYS = ("trnid", "valid", "tstid")


def locate_flowers(root: Path | None) -> Path:
    """root/flowers-102 (where torchvision puts it), or root itself, the first that holds jpg/."""
    assert root is not None  # the spec has a default root
    for candidate in (root / "flowers-102", root):
        if (candidate / "jpg").is_dir():
            return candidate
    raise DataError(
        f"Flowers-102 not found at {root}: expected flowers-102/ with jpg/image_<NNNNN>.jpg, "
        "imagelabels.mat and setid.mat; point data.root at the folder that contains flowers-102, "
        "or pass data.download=true"
    )


def decode_flowers(source: Path | None, resolution: int | None) -> Splits:
    """trnid + valid as the training split (2,040 images) and tstid as the test split (6,149):
    mkdt tunes nothing on a validation split, so the probe gets all labelled non-test images
    (torchvision's split="train" alone, which the MKDT code uses, has 10 per class). The classes
    are the label numbers "1".."102" (the release names none)."""
    assert source is not None  # locate_flowers never returns None
    labels_path, setid_path = source / "imagelabels.mat", source / "setid.mat"
    labels = whole_numbers(read_mat(labels_path, ("labels",))[0], labels_path, "labels")
    ids = [
        whole_numbers(values, setid_path, key, high=len(labels))
        for key, values in zip(_SPLIT_KEYS, read_mat(setid_path, _SPLIT_KEYS), strict=True)
    ]

    def items(numbers: list[int]) -> list[Item]:
        return [(source / "jpg" / f"image_{n:05d}.jpg", labels[n - 1] - 1) for n in numbers]

    classes = tuple(str(k) for k in range(1, max(labels) + 1))
    return decode_listed("flowers102", items(ids[0] + ids[1]), items(ids[2]), classes, resolution, source)


def download_flowers(root: Path) -> None:
    """Fetch 102flowers.tgz, imagelabels.mat and setid.mat into root/flowers-102 with
    torchvision."""
    from torchvision.datasets import Flowers102

    Flowers102(str(root), download=True)
