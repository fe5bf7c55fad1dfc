"""Dataset loaders on small stand-ins written in each real on-disk format, plus the cache and the
ImageData helpers. One test decodes the real CIFAR-10 JPEG archive when ../shared/data has it."""

import dataclasses
import gzip
import io
import pickle
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mkdt.data import DATASETS, ImageData, dataset_names, default_cache_dir, load_dataset
from mkdt.errors import DataError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def rng_images(seed: int, n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_pickle(path: Path, content: dict) -> None:
    path.write_bytes(pickle.dumps(content, protocol=2))


def write_image(path: Path, array: np.ndarray, **save_args) -> None:
    """(C, H, W) or (H, W) uint8 -> an image file; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = array.transpose(1, 2, 0) if array.ndim == 3 else array
    Image.fromarray(pixels).save(path, **save_args)


def solid(color: tuple[int, ...], size: int) -> np.ndarray:
    """A (C, size, size) image of one colour (JPEG keeps such images almost exactly)."""
    return np.broadcast_to(np.array(color, np.uint8)[:, None, None], (len(color), size, size))


@contextmanager
def data_error(match: str) -> Iterator[None]:
    """Expect a DataError whose one-line message matches `match`."""
    with pytest.raises(DataError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def count_decodes(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap DATASETS[name].decode so that calls are counted (len of the returned list)."""
    spec = DATASETS[name]
    calls: list[int] = []

    def counting(source, resolution):
        calls.append(1)
        return spec.decode(source, resolution)

    monkeypatch.setitem(DATASETS, name, dataclasses.replace(spec, decode=counting))
    return calls


# --- stand-ins in the real formats --------------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 3) -> dict[str, np.ndarray]:
    """cifar-10-batches-py/ with five training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, labels = [], []
    for i, file in enumerate([*(f"data_batch_{b}" for b in range(1, 6)), "test_batch"]):
        data = rng_images(i, per_batch, (3072,))
        batch_labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_pickle(
            folder / file,
            {
                b"batch_label": f"batch {i}".encode(),
                b"labels": batch_labels,
                b"data": data,
                b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
            },
        )
        images.append(data.reshape(-1, 3, 32, 32))
        labels += batch_labels
    write_pickle(
        folder / "batches.meta",
        {
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_cases_per_batch": per_batch,
            b"num_vis": 3072,
        },
    )
    n_train = 5 * per_batch
    return {
        "train_images": np.concatenate(images[:5]),
        "train_labels": np.array(labels[:n_train]),
        "test_images": images[5],
        "test_labels": np.array(labels[n_train:]),
    }


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    expected = {}
    for split, n in (("train", 6), ("test", 4)):
        data = rng_images(n, n, (3072,))
        fine = list(range(n))
        write_pickle(
            folder / split,
            {
                b"filenames": [b"x.png"] * n,
                b"batch_label": split.encode(),
                b"fine_labels": fine,
                b"coarse_labels": [0] * n,
                b"data": data,
            },
        )
        expected[f"{split}_images"] = data.reshape(-1, 3, 32, 32)
        expected[f"{split}_labels"] = np.array(fine)
    write_pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return expected


TINY_WNIDS = ["n03", "n01", "n02"]  # not alphabetical: wnids.txt order defines the labels
TINY_COLORS = [(220, 40, 40), (40, 200, 60), (30, 60, 210)]


def write_tinyimagenet(root: Path) -> Path:
    """tiny-imagenet-200/ with 2 training images per wnid (one grayscale) and 3 val images."""
    top = root / "tiny-imagenet-200"
    top.mkdir(parents=True)
    (top / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (top / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in TINY_WNIDS))
    for wnid, color in zip(TINY_WNIDS, TINY_COLORS, strict=True):
        write_image(top / "train" / wnid / "images" / f"{wnid}_0.JPEG", solid(color, 64))
        write_image(top / "train" / wnid / "images" / f"{wnid}_1.JPEG", solid(color, 64))
        (top / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    write_image(top / "train" / "n01" / "images" / "n01_1.JPEG", np.full((64, 64), 90, np.uint8))
    annotations = []
    for i, label in enumerate([2, 0, 1]):
        write_image(top / "val" / "images" / f"val_{i}.JPEG", solid(TINY_COLORS[label], 64))
        annotations.append(f"val_{i}.JPEG\t{TINY_WNIDS[label]}\t0\t0\t63\t63\n")
    (top / "val" / "val_annotations.txt").write_text("".join(annotations))
    write_image(top / "test" / "images" / "test_0.JPEG", solid((1, 2, 3), 64))  # unlabelled
    return top


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path) -> dict[str, np.ndarray]:
    """The four idx files: train ones raw, t10k ones gzipped (both variants are accepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {
        "train_images": rng_images(2, 7, (28, 28)),
        "train_labels": np.arange(7) % 10,
        "test_images": rng_images(3, 4, (28, 28)),
        "test_labels": np.array([9, 0, 5, 5]),
    }
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(expected["train_images"], 2051))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(expected["train_labels"], 2049))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(expected["test_images"], 2051))
    )
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(expected["test_labels"], 2049))
    )
    return expected


def write_tree(root: Path, splits: dict[str, dict[str, list[np.ndarray]]], ext: str = "png"):
    """{split folder ("" for none): {class: [images]}} as <split>/<class>/<i>.<ext> files."""
    for split, classes in splits.items():
        for name, images in classes.items():
            for i, image in enumerate(images):
                write_image(root / split / name / f"{i:04d}.{ext}", image)


def split_tree(n_train: int = 3, n_test: int = 2) -> dict[str, dict[str, list[np.ndarray]]]:
    """train/ and test/ with classes "cat" and "ant" (sorted: ant=0, cat=1), random 8x8 RGB."""
    return {
        split: {name: list(rng_images(10 * s + c, n, (3, 8, 8))) for c, name in enumerate(("cat", "ant"))}
        for s, (split, n) in enumerate((("train", n_train), ("test", n_test)))
    }


def tar_folder(folder: Path, archive: Path, prefix: str, mode: str = "w:xz") -> Path:
    """Pack folder into archive under prefix ("" for none), with a stray README.md at the top."""
    with tarfile.open(archive, mode) as tar:
        readme = b"# stray file\n"
        info = tarfile.TarInfo("README.md")
        info.size = len(readme)
        tar.addfile(info, io.BytesIO(readme))
        tar.add(folder, arcname=prefix or ".")
    return archive


def expected_from_tree(tree: dict[str, dict[str, list[np.ndarray]]], split: str):
    names = sorted(tree[split])
    images = [image for name in names for image in tree[split][name]]
    labels = [label for label, name in enumerate(names) for _ in tree[split][name]]
    return np.stack(images), np.array(labels)


def assert_matches(data: ImageData, expected: dict[str, np.ndarray]) -> None:
    for key, value in expected.items():
        tensor = getattr(data, key)
        assert tensor.dtype == (torch.uint8 if "images" in key else torch.int64), key
        assert torch.equal(tensor, torch.from_numpy(np.asarray(value)).to(tensor.dtype)), key


# --- registry and ImageData helpers -------------------------------------------------------------


def test_registry_names_and_default_cache_dir(monkeypatch, tmp_path):
    assert dataset_names() == [
        "cifar10",
        "cifar100",
        "cub200",
        "digits",
        "fashion-mnist",
        "fgvc-aircraft",
        "flowers102",
        "imagefolder",
        "stanford-dogs",
        "tinyimagenet",
    ]
    assert all(DATASETS[name].description for name in dataset_names())
    monkeypatch.setenv("MKDT_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("MKDT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "mkdt"


def toy(counts: tuple[int, ...] = (10, 10, 10)) -> ImageData:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).repeat(1, 1, 4, 4)
    return ImageData(
        "toy",
        images,
        labels,
        images[:2].clone(),
        labels[:2].clone(),
        tuple("abcde"[: len(counts)]),
        (0.5,),
        (0.25,),
    )


def test_subset_is_class_balanced_deterministic_and_keeps_test_split():
    data = toy()
    sub = data.subset(10, seed=3)
    assert torch.bincount(sub.train_labels).tolist() == [4, 3, 3]
    assert torch.equal(sub.train_images, data.subset(10, seed=3).train_images)
    assert not torch.equal(sub.train_images, data.subset(10, seed=4).train_images)
    assert torch.equal(sub.train_images[:, 0, 0, 0].sort().values, sub.train_images[:, 0, 0, 0])
    assert sub.test_images is data.test_images and sub.mean == data.mean
    assert data.subset(30, seed=0) is data and data.subset(99, seed=0) is data
    with data_error("at least 1"):
        data.subset(0, seed=0)


def test_subset_gives_a_small_class_share_to_the_others():
    sub = toy((1, 10, 10)).subset(9, seed=0)
    assert torch.bincount(sub.train_labels).tolist() == [1, 4, 4]


def test_resized_and_normalize():
    data = toy()
    assert data.resized(4) is data
    big = data.resized(9)
    assert big.train_images.shape == (30, 1, 9, 9) and big.test_images.shape == (2, 1, 9, 9)
    assert big.train_images.dtype == torch.uint8 and big.train_images.is_contiguous()
    assert torch.equal(big.train_images[:, :, 4, 4], data.train_images[:, :, 0, 0])  # flat images
    x = data.normalize(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tensor([[[[-2.0, 2.0]]]]))
    assert torch.equal(data.normalize(data.train_images.float()), data.normalize(data.train_images))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_stays_on_the_images_device():
    images = toy().train_images.cuda()
    x = toy().normalize(images)
    assert x.device == images.device and torch.allclose(x.cpu(), toy().normalize(images.cpu()))


# --- digits -------------------------------------------------------------------------------------


def test_digits_load_as_a_stratified_80_20_split(tmp_path):
    data = load_dataset("digits", cache_dir=tmp_path)
    assert data.train_images.shape == (1437, 1, 8, 8) and data.test_images.shape == (360, 1, 8, 8)
    assert data.train_images.dtype == torch.uint8 and int(data.train_images.max()) == 255
    assert data.classes == tuple("0123456789") and data.image_size == 8 and data.channels == 1
    share = torch.bincount(data.test_labels) / torch.bincount(data.train_labels).add(
        torch.bincount(data.test_labels)
    )
    assert torch.allclose(share, torch.full((10,), 0.2), atol=0.01)
    mean = data.train_images.double().div(255).mean().item()
    assert data.mean == pytest.approx((mean,)) and data.std[0] == pytest.approx(
        data.train_images.double().div(255).std(unbiased=False).item()
    )
    again = load_dataset("digits", cache_dir=tmp_path / "other")
    assert torch.equal(again.test_images, data.test_images)


# --- CIFAR --------------------------------------------------------------------------------------


def test_cifar10_pickles_load_exactly_with_published_stats(tmp_path):
    expected = write_cifar10(tmp_path / "raw")
    data = load_dataset("cifar10", tmp_path / "raw", cache_dir=tmp_path / "cache")
    assert_matches(data, expected)
    assert data.classes == CIFAR10_CLASSES and data.num_train == 15
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)
    inner = load_dataset("cifar10", tmp_path / "raw/cifar-10-batches-py", cache_dir=tmp_path / "c2")
    assert torch.equal(inner.train_images, data.train_images)


def test_cifar100_pickles_use_the_fine_labels(tmp_path):
    expected = write_cifar100(tmp_path)
    data = load_dataset("cifar100", str(tmp_path), cache_dir=tmp_path / "cache")
    assert_matches(data, expected)
    assert data.num_classes == 100 and data.classes[5] == "fine5"
    assert data.mean == (0.5071, 0.4865, 0.4409)


def truncate(path: Path, keep: int = 500) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def wrong_size(path: Path) -> None:
    write_pickle(path, {b"labels": [0, 1], b"data": np.zeros((2, 3000), np.uint8)})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncate, "cannot unpickle .*data_batch_3.*data.download=true"),
        (wrong_size, r"data_batch_3 holds data .*\(N, 3072\)"),
        (Path.unlink, "missing .*data_batch_3: CIFAR-10 needs data_batch_1"),
    ],
)
def test_damaged_cifar_batches_raise_data_error(tmp_path, damage, message):
    write_cifar10(tmp_path)
    damage(tmp_path / "cifar-10-batches-py/data_batch_3")
    with data_error(message):
        load_dataset("cifar10", tmp_path, cache_dir=tmp_path / "cache")


def test_missing_cifar_says_which_folder_and_how_to_fix(tmp_path, monkeypatch):
    with data_error("cifar-10-batches-py.*data.root.*data.download=true"):
        load_dataset("cifar10", tmp_path / "nowhere", cache_dir=tmp_path)
    monkeypatch.setenv("MKDT_DATA", str(tmp_path / "data"))
    with data_error(f"not found at {tmp_path / 'data' / 'cifar100'}"):
        load_dataset("cifar100", cache_dir=tmp_path)


def test_download_fetches_missing_files_and_wraps_failures(tmp_path, monkeypatch):
    spec = DATASETS["cifar10"]
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, download=write_cifar10))
    data = load_dataset("cifar10", tmp_path / "raw", download=True, cache_dir=tmp_path / "cache")
    assert data.num_train == 15

    def offline(root: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(spec, download=offline))
    with data_error("downloading into .* failed .*unreachable"):
        load_dataset("cifar10", tmp_path / "empty", download=True, cache_dir=tmp_path / "cache")


def test_cifar10_from_an_imagefolder_tar_xz_with_prefix_and_readme(tmp_path):
    tree = split_tree()
    write_tree(tmp_path / "tree", tree)
    archive = tar_folder(tmp_path / "tree", tmp_path / "c10.tar.xz", prefix="cifar10-png")
    data = load_dataset("cifar10", archive, cache_dir=tmp_path / "cache")
    assert data.classes == ("ant", "cat") and data.mean == (0.4914, 0.4822, 0.4465)
    train_images, train_labels = expected_from_tree(tree, "train")
    test_images, test_labels = expected_from_tree(tree, "test")
    assert_matches(
        data,
        {
            "train_images": train_images,
            "train_labels": train_labels,
            "test_images": test_images,
            "test_labels": test_labels,
        },
    )


# --- ImageFolder trees and archives -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_imagefolder_folder_and_archives_without_prefix_agree(tmp_path, kind):
    tree = split_tree()
    write_tree(tmp_path / "tree", tree)
    (tmp_path / "tree/README.md").write_text("not an image")
    (tmp_path / "tree/train/cat/.hidden.png").write_bytes(b"macOS debris")
    source = tmp_path / "tree"
    if kind == "tar.gz":
        source = tar_folder(source, tmp_path / "data.tar.gz", prefix="", mode="w:gz")
    elif kind == "zip":
        source = tmp_path / "data.zip"
        with zipfile.ZipFile(source, "w") as archive:
            for file in sorted((tmp_path / "tree").rglob("*")):
                archive.write(file, file.relative_to(tmp_path / "tree").as_posix())
    data = load_dataset("imagefolder", source, cache_dir=tmp_path / "cache")
    expected, labels = expected_from_tree(tree, "test")
    assert torch.equal(data.test_images, torch.from_numpy(expected))
    assert data.test_labels.tolist() == labels.tolist() and data.num_train == 6
    assert data.mean == pytest.approx(tuple(data.train_images.double().div(255).mean(dim=(0, 2, 3)).tolist()))


def test_tree_without_split_holds_out_10_percent_per_class(tmp_path):
    tree = {"": {"b": list(rng_images(0, 20, (3, 8, 8))), "a": list(rng_images(1, 10, (3, 8, 8)))}}
    write_tree(tmp_path / "tree", tree)
    data = load_dataset(str(tmp_path / "tree"), cache_dir=tmp_path / "cache")
    assert data.name == "imagefolder" and data.classes == ("a", "b")
    assert torch.bincount(data.test_labels).tolist() == [1, 2]
    assert torch.bincount(data.train_labels).tolist() == [9, 18]
    all_images = torch.cat([data.train_images, data.test_images]).flatten(1)
    assert len({tuple(row.tolist()) for row in all_images}) == 30  # disjoint and complete
    again = load_dataset(str(tmp_path / "tree"), cache_dir=tmp_path / "other")
    assert torch.equal(again.test_images, data.test_images)


def test_grayscale_trees_keep_one_channel_and_mixed_ones_become_rgb(tmp_path):
    gray = rng_images(0, 2, (8, 8))
    write_tree(tmp_path / "gray", {"": {"x": list(gray), "y": list(gray)}})
    data = load_dataset("imagefolder", tmp_path / "gray", cache_dir=tmp_path / "cache")
    assert data.channels == 1 and len(data.mean) == 1
    write_tree(tmp_path / "mixed", {"": {"x": list(gray), "y": list(rng_images(1, 2, (3, 8, 8)))}})
    data = load_dataset("imagefolder", tmp_path / "mixed", cache_dir=tmp_path / "cache")
    assert data.channels == 3
    x = torch.cat([data.train_images, data.test_images])[
        torch.cat([data.train_labels, data.test_labels]) == 0
    ]
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])


def test_mixed_sizes_need_a_resolution_which_resizes_on_decode(tmp_path):
    write_tree(
        tmp_path / "tree",
        {
            "": {
                "x": [solid((9, 99, 199), 8), solid((9, 99, 199), 8)],
                "y": [solid((50, 50, 50), 12), solid((50, 50, 50), 12)],
            }
        },
    )
    with data_error(r"different sizes \(e.g. 8x8 and 12x12\).*data.resolution"):
        load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    data = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache", resolution=6)
    assert data.train_images.shape == (2, 3, 6, 6)
    assert data.train_images[data.train_labels == 0][:, :, 3, 3].tolist() == [[9, 99, 199]]


def test_non_square_images_need_a_resolution(tmp_path):
    image = rng_images(0, 1, (3, 6, 10))[0]
    write_tree(tmp_path / "tree", {"": {"x": [image, image], "y": [image, image]}})
    with data_error("10x6 but MKDT needs square images.*data.resolution"):
        load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    data = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache", resolution=5)
    assert data.image_size == 5


def test_resolution_resizes_after_loading_and_the_cache_stays_native(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree", split_tree())
    calls = count_decodes(monkeypatch, "imagefolder")
    small = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path, resolution=4)
    native = load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path)
    assert small.train_images.shape[1:] == (3, 4, 4) and native.train_images.shape[1:] == (3, 8, 8)
    assert len(calls) == 1 and len(list((tmp_path / "datasets").glob("*.safetensors"))) == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda root: write_tree(root, {"": {"x": [solid((1, 2, 3), 4)]}}) or (root / "empty").mkdir(),
            "class folder empty in .* has no images",
        ),
        (
            lambda root: (root / "docs").mkdir(parents=True) or (root / "docs/README.md").write_text("x"),
            r"no images \(.jpg/.*expected an ImageFolder tree",
        ),
        (
            lambda root: (
                write_tree(root, {"": {"x": list(rng_images(0, 2, (3, 16, 16)))}}, ext="jpg")
                or truncate(root / "x/0001.jpg", keep=300)
            ),
            "cannot decode image x/0001.jpg in .*corrupt",
        ),
        (
            lambda root: write_tree(
                root,
                {
                    "train": {"x": [solid((1, 2, 3), 4)]},
                    "test": {"x": [solid((1, 2, 3), 4)], "z": [solid((3, 2, 1), 4)]},
                },
            ),
            r"test/ in .* has class folders missing from train/ \(z\)",
        ),
    ],
)
def test_bad_trees_raise_data_error(tmp_path, make, message):
    make(tmp_path / "tree")
    with data_error(message):
        load_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")


def test_bad_paths_and_archives_raise_data_error(tmp_path):
    (tmp_path / "broken.tar.xz").write_bytes(b"this is not a tar archive at all" * 20)
    with data_error("broken.tar.xz is not a tar archive .*ImageFolder tree"):
        load_dataset("imagefolder", tmp_path / "broken.tar.xz", cache_dir=tmp_path)
    write_tree(tmp_path / "tree", split_tree(n_train=20))
    archive = tar_folder(tmp_path / "tree", tmp_path / "cut.tar.xz", prefix="")
    truncate(archive, keep=archive.stat().st_size // 2)
    with data_error("cannot read archive .*cut.tar.xz .*truncated or corrupt"):
        load_dataset("imagefolder", archive, cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with data_error("is not a folder or a .tar/"):
        load_dataset("imagefolder", tmp_path / "notes.txt", cache_dir=tmp_path)
    with data_error("imagefolder dataset needs data.root"):
        load_dataset("imagefolder", cache_dir=tmp_path)
    with data_error("unknown dataset 'cifar11': expected one of cifar10, "):
        load_dataset("cifar11", cache_dir=tmp_path)


# --- Tiny ImageNet ------------------------------------------------------------------------------


def test_tinyimagenet_standard_layout(tmp_path):
    write_tinyimagenet(tmp_path)
    data = load_dataset("tinyimagenet", tmp_path, cache_dir=tmp_path / "cache")
    assert data.classes == tuple(TINY_WNIDS) and data.mean == (0.485, 0.456, 0.406)
    assert data.train_images.shape == (6, 3, 64, 64) and data.test_images.shape == (3, 3, 64, 64)
    assert data.train_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.test_labels.tolist() == [2, 0, 1]
    gray = data.train_images[3].int()  # n01_1.JPEG, saved as grayscale
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert (gray - 90).abs().max() <= 2
    for image, label in zip(data.test_images, data.test_labels, strict=True):
        color = torch.tensor(TINY_COLORS[label]).view(3, 1, 1)
        assert (image.int() - color).abs().max() <= 4  # JPEG is lossy
    inner = load_dataset("tinyimagenet", tmp_path / "tiny-imagenet-200", cache_dir=tmp_path / "c")
    assert torch.equal(inner.test_images, data.test_images)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda top: (top / "val/val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n"),
            "val_annotations.txt line 1 is not <file> TAB <wnid from wnids.txt>",
        ),
        (lambda top: (top / "val/val_annotations.txt").unlink(), "cannot read .*val_annotations.txt"),
        (lambda top: (top / "val/images/val_1.JPEG").unlink(), "cannot read .*val_1.JPEG"),
        (
            lambda top: [f.unlink() for f in (top / "train/n02/images").iterdir()],
            "no training images in .*n02/images: expected tiny-imagenet-200/ with wnids.txt",
        ),
    ],
)
def test_damaged_tinyimagenet_raises_data_error(tmp_path, damage, message):
    damage(write_tinyimagenet(tmp_path))
    with data_error(message):
        load_dataset("tinyimagenet", tmp_path, cache_dir=tmp_path / "cache")


def test_missing_tinyimagenet_says_how_to_fix(tmp_path):
    with data_error("expected tiny-imagenet-200/ .*data.download=true"):
        load_dataset("tinyimagenet", tmp_path, cache_dir=tmp_path)


# --- Fashion-MNIST ------------------------------------------------------------------------------


def test_fashion_mnist_raw_and_gzipped_idx_files(tmp_path):
    expected = write_fashion(tmp_path / "FashionMNIST/raw")  # torchvision's download layout
    data = load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert_matches(
        data, {key: value[:, None] if "images" in key else value for key, value in expected.items()}
    )
    assert data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"
    assert data.channels == 1 and data.image_size == 28
    assert data.mean[0] == pytest.approx(expected["train_images"].mean() / 255)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 28, 28)), 2049)),
            "magic number 2049, expected 2051",
        ),
        (
            lambda d: (d / "train-images-idx3-ubyte").write_bytes(
                idx_bytes(np.zeros((7, 28, 28)), 2051)[:-10]
            ),
            r"truncated .*\(7, 28, 28\)",
        ),
        (
            lambda d: (d / "t10k-labels-idx1-ubyte.gz").write_bytes(
                gzip.compress(idx_bytes(np.zeros(5), 2049))
            ),
            "4 images and 5 labels",
        ),
        (
            lambda d: (d / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b broken"),
            "cannot decompress .*t10k-images-idx3-ubyte.gz",
        ),
        (lambda d: (d / "t10k-images-idx3-ubyte.gz").unlink(), "missing .*t10k-images-idx3-ubyte"),
    ],
)
def test_damaged_fashion_mnist_raises_data_error(tmp_path, damage, message):
    write_fashion(tmp_path)
    damage(tmp_path)
    with data_error(message):
        load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")


def test_missing_fashion_mnist_names_the_files_and_the_debian_package(tmp_path):
    with data_error("train-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path)


# --- cache --------------------------------------------------------------------------------------


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "raw")
    calls = count_decodes(monkeypatch, "cifar10")
    first = load_dataset("cifar10", tmp_path / "raw", cache_dir=tmp_path / "cache")
    second = load_dataset("cifar10", tmp_path / "raw", cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and torch.equal(first.train_images, second.train_images)
    assert second.classes == first.classes and second.mean == first.mean
    assert [p.name[:8] for p in (tmp_path / "cache/datasets").iterdir()] == ["cifar10-"]


def test_changed_source_files_are_decoded_again(tmp_path, monkeypatch):
    write_fashion(tmp_path)
    calls = count_decodes(monkeypatch, "fashion-mnist")
    load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(7, 3), 2049))
    data = load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and data.train_labels.tolist() == [3] * 7


def test_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    write_fashion(tmp_path)  # the cache folder lies inside the data folder: it must not count
    first = load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache/datasets").iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    calls = count_decodes(monkeypatch, "fashion-mnist")
    with pytest.warns(UserWarning, match="unreadable.*decoding the dataset again"):
        again = load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and torch.equal(again.train_images, first.train_images)
    load_dataset("fashion-mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert len(calls) == 1  # the rebuilt file is used


# --- real data ----------------------------------------------------------------------------------


@pytest.mark.slow  # decodes all 60,000 CIFAR-10 JPEGs
def test_real_cifar10_jpeg_archive(cifar10_jpeg):
    data = cifar10_jpeg
    assert data.train_images.shape == (50_000, 3, 32, 32)
    assert data.test_images.shape == (10_000, 3, 32, 32)
    assert data.classes == CIFAR10_CLASSES
    assert torch.bincount(data.train_labels).tolist() == [5000] * 10
    assert torch.bincount(data.test_labels).tolist() == [1000] * 10
    mean = data.train_images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.491, 0.482, 0.447]), atol=0.01)
