"""CUB-200-2011 (CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt and
classes.txt, each with lines '<id> <value>', and images/<class>/<file>.jpg). mkdt cannot download
it."""

from __future__ import annotations

from pathlib import Path

from mkdt.data.formats.listed import DAMAGED, Item, decode_listed, read_pairs
from mkdt.data.types import Splits
from mkdt.errors import DataError

_CUB_URL = "https://www.vision.caltech.edu/datasets/cub_200_2011/"
_CUB_FILES = "images.txt, image_class_labels.txt, train_test_split.txt, classes.txt"


def locate_cub(root: Path | None) -> Path:
    """root/CUB_200_2011, or root itself when it holds images.txt."""
    assert root is not None  # the spec has a default root
    for candidate in (root / "CUB_200_2011", root):
        if (candidate / "images.txt").is_file():
            return candidate
    raise DataError(
        f"CUB-200-2011 not found at {root}: expected CUB_200_2011/ with {_CUB_FILES} and "
        f"images/<class>/<file>.jpg; mkdt cannot download it: get CUB_200_2011.tgz from {_CUB_URL}, "
        "unpack it and point data.root at the folder that holds CUB_200_2011"
    )


def _entry(table: dict[str, str], image_id: str, path: Path, allowed: set[str], what: str) -> str:
    """The value of image_id in a '<id> <value>' file, which must be one of `allowed`."""
    value = table.get(image_id)
    if value not in allowed:
        found = "no line" if value is None else f"{value!r}"
        raise DataError(f"{path} has {found} for image {image_id}, expected '<id> <{what}>'; {DAMAGED}")
    return value


def decode_cub(source: Path | None, resolution: int | None) -> Splits:
    """The official split (train_test_split.txt: 5,994 training and 5,794 test images); the
    classes are the names in classes.txt order, labels image_class_labels.txt's minus one."""
    assert source is not None  # locate_cub never returns None
    classes = tuple(name for _, _, name in read_pairs(source / "classes.txt"))
    labels_path, split_path = source / "image_class_labels.txt", source / "train_test_split.txt"
    labels = {key: value for _, key, value in read_pairs(labels_path)}
    is_train = {key: value for _, key, value in read_pairs(split_path)}
    class_ids = {str(k) for k in range(1, len(classes) + 1)}
    splits: dict[str, list[Item]] = {"1": [], "0": []}
    for _, image_id, relpath in read_pairs(source / "images.txt"):
        label = _entry(labels, image_id, labels_path, class_ids, f"class 1..{len(classes)}")
        flag = _entry(is_train, image_id, split_path, {"0", "1"}, "1 (train) or 0 (test)")
        splits[flag].append((source / "images" / relpath, int(label) - 1))
    return decode_listed("cub200", splits["1"], splits["0"], classes, resolution, source)
