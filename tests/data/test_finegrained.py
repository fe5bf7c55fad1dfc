"""The fine-grained downstream datasets (fgvc-aircraft, cub200, stanford-dogs, flowers102) on
small stand-ins written in each official on-disk format: text lists, MATLAB .mat lists written
with scipy, and JPEGs of differing sizes."""

import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from mkdt.cli import main
from mkdt.config import load_config
from mkdt.data import DATASETS, load_dataset
from mkdt.errors import ConfigError
from tests.data.test_loaders import count_decodes, data_error, write_image

SIZES = ((40, 30), (24, 36), (33, 33))  # (width, height) of the images, in turn


class StandIn(NamedTuple):
    """What a stand-in holds: the folder to pass as data.root and, in the loader's order, each
    split's image files and 0-based labels."""

    root: Path
    classes: tuple[str, ...]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def write_jpeg(path: Path, seed: int, gray: bool = False) -> Path:
    """A random JPEG of one of SIZES (grayscale if asked)."""
    width, height = SIZES[seed % len(SIZES)]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width) if gray else (3, height, width))
    write_image(path, pixels.astype(np.uint8))
    return path


def expected_pixels(path: Path, size: int) -> torch.Tensor:
    """The (3, size, size) uint8 image a loader must produce from an image file: decoded as RGB
    and squashed to size x size with Pillow's bilinear filter."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(resized).transpose(2, 0, 1).copy())


def save_mat(path: Path, **variables: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, variables)


def cell(strings: list[str]) -> np.ndarray:
    """An N x 1 MATLAB cell array of strings, as in Stanford Dogs' lists."""
    array = np.empty((len(strings), 1), dtype=object)
    for i, text in enumerate(strings):
        array[i, 0] = text
    return array


# --- stand-ins in the official formats ----------------------------------------------------------

AIRCRAFT_VARIANTS = ("707-320", "Boeing 717", "Cessna 172")


def write_aircraft(root: Path) -> StandIn:
    """fgvc-aircraft-2013b/data/: 2 trainval images per variant (one in train, one in val) and 3
    test images, with the train/val lists the release also has."""
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(AIRCRAFT_VARIANTS) + "\n")
    (data / "families.txt").write_text("Boeing 707\nBoeing 717\nCessna 172\n")
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    labels = {"train": [0, 1, 2], "val": [2, 1, 0], "test": [1, 2, 0]}
    for s, split in enumerate(splits):
        for i, label in enumerate(labels[split]):
            image_id = f"{1000000 + 10 * s + i:07d}"
            splits[split].append((write_jpeg(data / "images" / f"{image_id}.jpg", 10 * s + i), label))
    lists = {**splits, "trainval": splits["train"] + splits["val"]}
    for split, items in lists.items():
        lines = "".join(f"{path.stem} {AIRCRAFT_VARIANTS[label]}\n" for path, label in items)
        (data / f"images_variant_{split}.txt").write_text(lines)
    return StandIn(root, AIRCRAFT_VARIANTS, lists["trainval"], splits["test"])


CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")


def write_cub(root: Path) -> StandIn:
    """CUB_200_2011/ with 3 images per class (image 2 grayscale) and a mixed train/test split."""
    top = root / "CUB_200_2011"
    top.mkdir(parents=True)
    (top / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(CUB_CLASSES, 1)))
    flags = [1, 0, 1, 1, 1, 0, 0, 1, 1]
    images, labels, split, train, test = [], [], [], [], []
    for i, flag in enumerate(flags):
        image_id, label = i + 1, i // 3
        rel = f"{CUB_CLASSES[label]}/{CUB_CLASSES[label][4:]}_{i:04d}_{100 + i}.jpg"
        path = write_jpeg(top / "images" / rel, i, gray=i == 1)
        images.append(f"{image_id} {rel}\n")
        labels.append(f"{image_id} {label + 1}\n")
        split.append(f"{image_id} {flag}\n")
        (train if flag else test).append((path, label))
    (top / "images.txt").write_text("".join(images))
    (top / "image_class_labels.txt").write_text("".join(labels))
    (top / "train_test_split.txt").write_text("".join(split))
    (top / "README").write_text("The Caltech-UCSD Birds-200-2011 Dataset\n")
    return StandIn(root, CUB_CLASSES, train, test)


DOG_BREEDS = ("n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog")


def write_dogs(root: Path) -> StandIn:
    """Images/<synset-breed>/ with 3 images per breed, and lists.tar's file_list.mat,
    train_list.mat and test_list.mat (file_list, annotation_list, labels as N x 1 doubles)."""
    entries = []
    for i in range(9):
        label = i % 3
        synset = DOG_BREEDS[label].split("-")[0]
        rel = f"{DOG_BREEDS[label]}/{synset}_{1000 + i}.jpg"
        entries.append((rel, label, write_jpeg(root / "Images" / rel, i)))
    lists = {"train": entries[:5], "test": entries[5:], "file": entries}
    for split, chosen in lists.items():
        save_mat(
            root / f"{split}_list.mat",
            file_list=cell([rel for rel, _, _ in chosen]),
            annotation_list=cell([rel.removesuffix(".jpg") for rel, _, _ in chosen]),
            labels=np.array([[label + 1.0] for _, label, _ in chosen]),
        )
    as_items = {split: [(path, label) for _, label, path in lists[split]] for split in ("train", "test")}
    return StandIn(root, DOG_BREEDS, as_items["train"], as_items["test"])


FLOWER_LABELS = [2, 1, 3, 1, 2, 3, 3, 2, 1]  # imagelabels.mat: 1-based, image 1 first


def write_flowers(root: Path) -> StandIn:
    """flowers-102/ (torchvision's folder) with jpg/image_0000N.jpg, imagelabels.mat (1 x N) and
    setid.mat (trnid, valid, tstid as 1 x k image numbers)."""
    top = root / "flowers-102"
    paths = [write_jpeg(top / "jpg" / f"image_{n:05d}.jpg", n) for n in range(1, 10)]
    save_mat(top / "imagelabels.mat", labels=np.array([FLOWER_LABELS], dtype=np.float64))
    ids = {"trnid": [2, 1, 3], "valid": [9, 5], "tstid": [4, 6, 7, 8]}
    save_mat(top / "setid.mat", **{key: np.array([value], dtype=np.float64) for key, value in ids.items()})

    def items(numbers: list[int]) -> list[tuple[Path, int]]:
        return [(paths[n - 1], FLOWER_LABELS[n - 1] - 1) for n in numbers]

    return StandIn(root, ("1", "2", "3"), items(ids["trnid"] + ids["valid"]), items(ids["tstid"]))


WRITERS: dict[str, Callable[[Path], StandIn]] = {
    "fgvc-aircraft": write_aircraft,
    "cub200": write_cub,
    "stanford-dogs": write_dogs,
    "flowers102": write_flowers,
}
NAMES = list(WRITERS)


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_official_layout_loads_every_listed_image_in_its_split(tmp_path, name):
    stand_in = WRITERS[name](tmp_path / "data")
    data = load_dataset(name, stand_in.root, cache_dir=tmp_path / "cache", resolution=8)
    assert data.name == name and data.classes == stand_in.classes
    assert data.train_images.shape == (len(stand_in.train), 3, 8, 8)
    assert data.test_images.shape == (len(stand_in.test), 3, 8, 8)
    for split, items in (("train", stand_in.train), ("test", stand_in.test)):
        assert getattr(data, f"{split}_labels").tolist() == [label for _, label in items]
        for image, (path, _) in zip(getattr(data, f"{split}_images"), items, strict=True):
            assert torch.equal(image, expected_pixels(path, 8)), path


def test_aircraft_keeps_the_copyright_banner_and_grayscale_cub_images_become_rgb(tmp_path):
    stand_in = write_aircraft(tmp_path / "air")
    banner = np.full((3, 60, 80), 250, np.uint8)
    banner[:, -20:] = 5  # the bottom 20 rows, where the official images carry their banner
    write_image(stand_in.train[0][0], banner, quality=95)
    data = load_dataset("fgvc-aircraft", stand_in.root, cache_dir=tmp_path / "cache", resolution=6)
    first = data.train_images[0].int()
    assert (first[:, 0] > 240).all() and (first[:, -1] < 15).all()
    cub = load_dataset("cub200", write_cub(tmp_path / "cub").root, cache_dir=tmp_path / "cache")
    gray = cub.test_images[0]  # image 2, saved as grayscale, is the first test image
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])


@pytest.mark.parametrize("name", NAMES)
def test_the_root_may_be_the_dataset_folder_itself(tmp_path, name):
    stand_in = WRITERS[name](tmp_path / "data")
    inner = {
        "fgvc-aircraft": "fgvc-aircraft-2013b/data",
        "cub200": "CUB_200_2011",
        "stanford-dogs": ".",
        "flowers102": "flowers-102",
    }[name]
    outer = load_dataset(name, stand_in.root, cache_dir=tmp_path / "c1", resolution=4)
    same = load_dataset(name, stand_in.root / inner, cache_dir=tmp_path / "c2", resolution=4)
    assert torch.equal(outer.test_images, same.test_images)


def test_default_resolution_is_64_and_each_resolution_decodes_from_the_originals(tmp_path, monkeypatch):
    stand_in = write_flowers(tmp_path / "data")
    assert all(DATASETS[name].resolution == 64 for name in NAMES)
    calls = count_decodes(monkeypatch, "flowers102")
    default = load_dataset("flowers102", stand_in.root, cache_dir=tmp_path / "cache")
    assert default.image_size == 64
    after_default = load_dataset("flowers102", stand_in.root, cache_dir=tmp_path / "cache", resolution=8)
    again = load_dataset("flowers102", stand_in.root, cache_dir=tmp_path / "cache", resolution=8)
    fresh = load_dataset("flowers102", stand_in.root, cache_dir=tmp_path / "fresh", resolution=8)
    assert len(calls) == 3  # 64, 8, and 8 into the fresh cache; the second 8 came from the cache
    assert torch.equal(after_default.train_images, fresh.train_images)
    assert torch.equal(again.train_images, fresh.train_images)
    assert len(list((tmp_path / "cache" / "datasets").glob("*.safetensors"))) == 2


# --- problems with the files --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_corrupt_image_is_named(tmp_path, name):
    stand_in = WRITERS[name](tmp_path / "data")
    path = stand_in.test[-1][0]
    path.write_bytes(path.read_bytes()[:200])
    with data_error(f"cannot decode image {re.escape(str(path))} .*corrupt"):
        load_dataset(name, stand_in.root, cache_dir=tmp_path / "cache", resolution=8)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("fgvc-aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt"),
        ("cub200", "CUB_200_2011/train_test_split.txt"),
        ("stanford-dogs", "test_list.mat"),
        ("flowers102", "flowers-102/setid.mat"),
    ],
)
def test_a_missing_list_file_is_named(tmp_path, name, missing):
    stand_in = WRITERS[name](tmp_path / "data")
    (stand_in.root / missing).unlink()
    with data_error(
        f"cannot read {re.escape(str(stand_in.root / missing))} .*check that the dataset is complete"
    ):
        load_dataset(name, stand_in.root, cache_dir=tmp_path / "cache")


def _rewrite(path: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / path).write_text(text)


@pytest.mark.parametrize(
    ("name", "damage", "message"),
    [
        (
            "fgvc-aircraft",
            _rewrite("fgvc-aircraft-2013b/data/images_variant_test.txt", "1000020 Boeing 747\n"),
            "images_variant_test.txt line 1: variant 'Boeing 747' is not in variants.txt",
        ),
        (
            "fgvc-aircraft",
            _rewrite("fgvc-aircraft-2013b/data/images_variant_trainval.txt", "\n\n"),
            "images_variant_trainval.txt is empty",
        ),
        (
            "cub200",
            _rewrite("CUB_200_2011/image_class_labels.txt", "1 1\n2 4\n"),
            r"image_class_labels.txt has '4' for image 2, expected '<id> <class 1..3>'",
        ),
        (
            "cub200",
            _rewrite("CUB_200_2011/train_test_split.txt", "1 1\n"),
            r"train_test_split.txt has no line for image 2, expected '<id> <1 \(train\) or 0",
        ),
        (
            "cub200",
            _rewrite("CUB_200_2011/images.txt", "1\n"),
            "images.txt line 1 is not '<id> <value>'",
        ),
        (
            "stanford-dogs",
            lambda root: save_mat(
                root / "train_list.mat", file_list=cell(["a/1.jpg", "b/2.jpg"]), labels=[[1.0]]
            ),
            "train_list.mat must hold as many labels as paths in file_list",
        ),
        (
            "stanford-dogs",
            lambda root: save_mat(root / "test_list.mat", file_list=cell(["x/1.jpg"]), labels=[[2.0]]),
            "gives label 2 to images of n02085782-Japanese_spaniel and of x",
        ),
        (
            "stanford-dogs",
            lambda root: save_mat(root / "test_list.mat", file_list=cell(["x/1.jpg"]), labels=[[1.5]]),
            "test_list.mat variable 'labels' must hold whole numbers from 1",
        ),
        (
            "flowers102",
            lambda root: save_mat(root / "flowers-102/setid.mat", trnid=[[1]], valid=[[2]], tstid=[[10]]),
            "setid.mat variable 'tstid' must hold whole numbers from 1 up to 9",
        ),
        (
            "flowers102",
            lambda root: save_mat(root / "flowers-102/setid.mat", trnid=[[1]], valid=[[2]]),
            "setid.mat has no 'tstid' variable",
        ),
        (
            "flowers102",
            lambda root: (root / "flowers-102/imagelabels.mat").write_bytes(b"not a mat file" * 20),
            "cannot read .*imagelabels.mat as a MATLAB .mat file",
        ),
    ],
)
def test_damaged_lists_raise_one_line_data_errors(tmp_path, name, damage, message):
    stand_in = WRITERS[name](tmp_path / "data")
    damage(stand_in.root)
    with data_error(message):
        load_dataset(name, stand_in.root, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "fgvc-aircraft",
            "FGVC-Aircraft not found at .*expected fgvc-aircraft-2013b/data/ .*data.download=true",
        ),
        ("flowers102", "Flowers-102 not found at .*expected flowers-102/ .*data.download=true"),
        ("cub200", "CUB-200-2011 not found .*cannot download it: get CUB_200_2011.tgz from https://"),
        ("stanford-dogs", "Stanford Dogs not found .*cannot download it: get images.tar and lists.tar from"),
    ],
)
def test_missing_dataset_says_where_to_get_it(tmp_path, name, message):
    download = DATASETS[name].download is None  # asking for a download changes nothing there
    with data_error(message):
        load_dataset(name, tmp_path, cache_dir=tmp_path / "cache", download=download)


@pytest.mark.parametrize(
    ("name", "torchvision_class"), [("fgvc-aircraft", "FGVCAircraft"), ("flowers102", "Flowers102")]
)
def test_download_goes_through_torchvision(tmp_path, monkeypatch, name, torchvision_class):
    import torchvision.datasets

    fetched = []

    def fake(root, download):
        fetched.append(download)
        WRITERS[name](Path(root))

    monkeypatch.setattr(torchvision.datasets, torchvision_class, fake)
    data = load_dataset(name, tmp_path / "raw", cache_dir=tmp_path / "cache", download=True, resolution=4)
    assert fetched == [True] and data.num_train > 0


# --- registration -------------------------------------------------------------------------------


def test_listed_by_mkdt_datasets_and_accepted_as_evaluate_tasks(tmp_path, capsys):
    assert main(["datasets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in NAMES)
    tasks = f"evaluate.tasks=[cub200={tmp_path}, flowers102, stanford-dogs={tmp_path}, fgvc-aircraft]"
    assert load_config("demo", overrides=[tasks]).evaluate.tasks[0] == f"cub200={tmp_path}"
    with pytest.raises(ConfigError, match="unknown task 'unknownname': choose from .*cub200"):
        load_config("demo", overrides=["evaluate.tasks=[unknownname]"])
