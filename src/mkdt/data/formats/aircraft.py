"""FGVC-Aircraft 2013b (fgvc-aircraft-2013b/data/: images/<id>.jpg, variants.txt and
images_variant_<split>.txt with lines '<id> <variant>'), classified by its 100 variants, and its
download with torchvision."""

from __future__ import annotations

from pathlib import Path

from mkdt.data.formats.listed import DAMAGED, Item, decode_listed, read_lines, read_pairs
from mkdt.data.types import Splits
from mkdt.errors import DataError

_LAYOUT = (
    "fgvc-aircraft-2013b/data/ with images/<id>.jpg, variants.txt, images_variant_trainval.txt "
    "and images_variant_test.txt"
)


def locate_aircraft(root: Path | None) -> Path:
    """The data folder: root/fgvc-aircraft-2013b/data, root/data or root itself, the first that
    holds images/ and variants.txt."""
    assert root is not None  # the spec has a default root
    for candidate in (root / "fgvc-aircraft-2013b" / "data", root / "data", root):
        if (candidate / "images").is_dir() and (candidate / "variants.txt").is_file():
            return candidate
    raise DataError(
        f"FGVC-Aircraft not found at {root}: expected {_LAYOUT}; point data.root at the folder "
        "that contains fgvc-aircraft-2013b, or pass data.download=true"
    )


def _aircraft_split(source: Path, split: str, index: dict[str, int]) -> list[Item]:
    """(image path, label) of every image listed in images_variant_<split>.txt."""
    path = source / f"images_variant_{split}.txt"
    items = []
    for number, image_id, variant in read_pairs(path):
        if variant not in index:
            raise DataError(f"{path} line {number}: variant {variant!r} is not in variants.txt; {DAMAGED}")
        items.append((source / "images" / f"{image_id}.jpg", index[variant]))
    return items


def decode_aircraft(source: Path | None, resolution: int | None) -> Splits:
    """trainval as the training split and test as the test split (the usual protocol, and the
    MKDT code's); the classes are the variants in variants.txt order, as torchvision's labels.
    Whole images are kept, the 20-pixel copyright banner at the bottom included, as torchvision's
    FGVCAircraft and the MKDT code read them."""
    assert source is not None  # locate_aircraft never returns None
    variants = [line for _, line in read_lines(source / "variants.txt")]
    index = {variant: label for label, variant in enumerate(variants)}
    train, test = (_aircraft_split(source, split, index) for split in ("trainval", "test"))
    return decode_listed("fgvc-aircraft", train, test, tuple(variants), resolution, source)


def download_aircraft(root: Path) -> None:
    """Fetch and unpack fgvc-aircraft-2013b.tar.gz into root with torchvision."""
    from torchvision.datasets import FGVCAircraft

    FGVCAircraft(str(root), download=True)
