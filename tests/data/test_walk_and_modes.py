"""Dataset folder walks (links, cycles), 8-bit conversion of Pillow modes, memory estimate, cache warning."""

from __future__ import annotations

import colorsys
import errno
import io
import os
import signal
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mkdt import files
from mkdt.data import load_dataset
from mkdt.data import memory as memory_module
from mkdt.data.cache import _fingerprint
from mkdt.data.decode import decode_image, to_8bit
from mkdt.data.registry import source_identity
from mkdt.data.walk import walk_tree
from mkdt.errors import DataError


class Hung(BaseException):
    """Raised by :func:`within`; not an OSError (which a walk may swallow) nor an Exception (which
    a catch-all may turn into an error message)."""


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail the test instead of hanging when the block runs longer than ``seconds``."""

    def expire(_signum, _frame):
        raise Hung(f"still running after {seconds} s: the walk does not terminate")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def image_tree(root: Path, classes: int = 3, per_class: int = 12) -> Path:
    """``classes`` class folders of ``per_class`` distinct 8x8 grey PNGs."""
    gen = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(gen.integers(0, 256, (8, 8), dtype=np.uint8)).save(
                root / f"c{c}" / f"{i:02d}.png"
            )
    return root


def one_line_data_error(match: str, call) -> str:
    with within(20), pytest.raises(DataError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def every_reader(root: Path, cache: Path) -> list:
    """The four readers of a folder: decoding, the cache fingerprint, the source identity and
    the bare walk."""
    source_identity.cache_clear()
    return [
        lambda: load_dataset(str(root), cache_dir=cache),
        lambda: _fingerprint(root, skip=cache),
        lambda: source_identity(str(root), None),
        lambda: list(walk_tree(root)),
    ]


# ---------------------------------------------------------------- links


@pytest.mark.parametrize(
    ("link", "target", "match"),
    [
        ("c0/up", "..", "a folder that holds the link: following it would loop forever"),
        ("c0/top", "../..", "a folder that holds the link: following it would loop forever"),
        ("self", ".", "a folder that holds the link"),
        ("c0/other", "../c1", "inside the dataset folder .*read twice, under two labels"),
        ("c0/copy.png", "../c1/00.png", "inside the dataset folder .*read twice"),
    ],
)
def test_links_back_into_the_dataset_are_refused_by_every_reader(tmp_path, link, target, match):
    root = image_tree(tmp_path / "ds")
    os.symlink(target, root / link)
    for read in every_reader(root, tmp_path / "cache"):
        message = one_line_data_error(match, read)
        assert f"link {root / link} " in message and "remove the link" in message


def test_a_link_cycle_in_every_class_folder_ends_at_once(tmp_path):
    root = image_tree(tmp_path / "ds")
    for c in range(3):
        os.symlink("..", root / f"c{c}" / "up")
    for read in every_reader(root, tmp_path / "cache"):
        one_line_data_error("loop forever", read)


def test_a_cycle_outside_the_dataset_is_caught_too(tmp_path):
    root = image_tree(tmp_path / "ds")
    outside = image_tree(tmp_path / "elsewhere", classes=1)
    os.symlink(outside / "c0", root / "c3")
    os.symlink("..", outside / "c0" / "again")  # a link out of the dataset that loops there
    for read in every_reader(root, tmp_path / "cache"):
        one_line_data_error("holds the link", read)


def test_links_out_of_the_dataset_are_followed_once(tmp_path):
    root = image_tree(tmp_path / "ds", classes=2)
    outside = image_tree(tmp_path / "other-disk", classes=2, per_class=5)
    os.symlink(outside / "c0", root / "c2")  # a class kept elsewhere
    os.symlink(outside / "c1" / "00.png", root / "c1" / "linked.png")  # one image linked in
    copy = image_tree(tmp_path / "copy", classes=2)
    (copy / "c2").mkdir()
    for i in range(5):
        (copy / "c2" / f"{i:02d}.png").write_bytes((outside / "c0" / f"{i:02d}.png").read_bytes())
    (copy / "c1" / "linked.png").write_bytes((outside / "c1" / "00.png").read_bytes())
    with within(20):
        linked = load_dataset(str(root), cache_dir=tmp_path / "cache")
        copied = load_dataset(str(copy), cache_dir=tmp_path / "cache")
    assert linked.classes == ("c0", "c1", "c2") and linked.num_train + len(linked.test_images) == 30
    assert np.array_equal(linked.train_images, copied.train_images)
    assert np.array_equal(linked.train_labels, copied.train_labels)
    # the identity sees the same files (names, sizes) as the copy; the fingerprint terminates
    source_identity.cache_clear()
    assert (
        source_identity(str(root), None)["files_sha256"] == source_identity(str(copy), None)["files_sha256"]
    )
    assert _fingerprint(root, skip=tmp_path / "cache").count("\n") == 29


def test_two_links_to_one_outside_folder_or_file_are_refused(tmp_path):
    outside = image_tree(tmp_path / "other-disk", classes=1)
    root = image_tree(tmp_path / "ds", classes=2)
    os.symlink(outside / "c0", root / "c2")
    os.symlink(outside / "c0", root / "c3")
    for read in every_reader(root, tmp_path / "cache"):
        one_line_data_error(r"c3 and .*c2 lead to the same folder", read)
    os.unlink(root / "c3")
    os.symlink(outside / "c0" / "00.png", root / "c1" / "twice.png")  # also reached through c2
    one_line_data_error("lead to the same file", lambda: list(walk_tree(root)))


def test_the_walk_lists_like_os_walk_and_keeps_hard_links_and_dangling_links(tmp_path):
    root = image_tree(tmp_path / "ds", classes=2, per_class=2)
    (root / "c1" / "deep").mkdir()
    (root / "c1" / "deep" / "x.txt").write_text("x")
    (root / "top.txt").write_text("t")
    os.link(root / "c0" / "00.png", root / "c1" / "hard.png")  # a hard link counts like a copy
    os.symlink(root / "gone.png", root / "c0" / "dangling.png")
    expected = []
    for folder, subdirs, names in os.walk(root):
        subdirs.sort()
        expected += [Path(folder, name).relative_to(root).parts for name in sorted(names)]
    assert [e.parts for e in walk_tree(root) if not e.is_dir] == expected
    assert ("c1", "hard.png") in expected and ("c0", "dangling.png") in expected
    kept = list(walk_tree(root, lambda parts, is_dir: parts[-1] != "deep"))
    assert ("c1", "deep") not in [e.parts for e in kept] and all(e.parts[:2] != ("c1", "deep") for e in kept)


def test_a_dataset_given_through_a_link_is_walked_normally(tmp_path):
    root = image_tree(tmp_path / "ds", classes=2, per_class=3)
    os.symlink(root, tmp_path / "alias")
    assert len([e for e in walk_tree(tmp_path / "alias") if not e.is_dir]) == 6


# ---------------------------------------------------------------- image modes


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def round_half_up(values: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.uint8)


SIXTEEN = np.array([[0, 1, 128, 129, 256], [257, 32767, 32896, 65534, 65535]], dtype=np.uint16)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clamped(fmt):
    data = encoded(Image.fromarray(SIXTEEN), fmt)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I;16"
    expected = round_half_up(SIXTEEN / 257)
    assert expected.tolist() == [[0, 0, 0, 1, 1], [1, 127, 128, 255, 255]]
    assert np.array_equal(decode_image(data, "x"), expected)
    assert np.array_equal(decode_image(data, "x", "RGB"), np.repeat(expected[..., None], 3, axis=2))


def test_16_bit_grey_in_either_byte_order_and_in_memory():
    big_endian = Image.frombytes("I;16B", (5, 2), SIXTEEN.astype(">u2").tobytes())
    assert np.array_equal(decode_image(encoded(big_endian, "TIFF"), "x"), round_half_up(SIXTEEN / 257))
    for mode, dtype in (("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16B", ">u2")):
        image = Image.frombytes(mode, (5, 2), SIXTEEN.astype(dtype).tobytes())
        assert np.array_equal(to_8bit(image, "x"), round_half_up(SIXTEEN / 257)), mode


def tiff_12_bit(values: list[int], width: int, height: int) -> bytes:
    """A grey TIFF declaring 12 bits per sample (which Pillow cannot write), packed MSB first."""
    pixels = b""
    for row in range(height):  # each row starts on a byte
        bits = "".join(format(v, "012b") for v in values[row * width : (row + 1) * width])
        bits += "0" * (-len(bits) % 8)
        pixels += bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))
    tags = [(256, width), (257, height), (258, 12), (259, 1), (262, 1), (273, 0), (277, 1), (278, height)]
    tags.append((279, len(pixels)))
    start = 8 + 2 + 12 * len(tags) + 4
    ifd = b"".join(
        struct.pack("<HHII", tag, 4, 1, start if tag == 273 else value)
        if tag in (273, 279)
        else struct.pack("<HHIHH", tag, 3, 1, value, 0)
        for tag, value in tags
    )
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + ifd + struct.pack("<I", 0) + pixels


def test_a_12_bit_tiff_is_scaled_by_its_declared_range():
    values = [0, 1, 2047, 2048, 4094, 4095]
    data = tiff_12_bit(values, 3, 2)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "I;16" and np.asarray(image).max() == 4095
    expected = round_half_up(np.array(values).reshape(2, 3) * 255 / 4095)
    assert np.array_equal(decode_image(data, "x"), expected)


def test_float_grey_in_0_1_is_scaled_and_other_floats_are_refused():
    unit = np.array([[0.0, 0.001, 0.5, 1 / 255], [0.998, 0.999, 1.0, 0.25]], dtype=np.float32)
    data = encoded(Image.fromarray(unit), "TIFF")
    assert np.array_equal(decode_image(data, "x"), round_half_up(unit.astype(np.float64) * 255))
    for bad, seen in ((unit * 2, r"values in \[0, 2\]"), (unit - 0.5, "values in"), (unit * np.nan, "NaN")):
        data = encoded(Image.fromarray(bad.astype(np.float32)), "TIFF")
        match = f"a.tif has 32-bit float pixels .*{seen}.*only in \\[0, 1\\]"
        one_line_data_error(match, lambda data=data: decode_image(data, "a.tif"))


def test_32_bit_integers_and_lab_are_refused_in_one_line():
    wide = encoded(Image.fromarray(np.array([[0, 70000]], dtype=np.int32)), "TIFF")
    one_line_data_error(
        "a.tif has 32-bit or signed integer pixels .*8- or 16-bit PNG", lambda: decode_image(wide, "a.tif")
    )
    lab = encoded(Image.new("LAB", (2, 2), (50, 10, 20)), "TIFF")
    one_line_data_error("CIELAB", lambda: decode_image(lab, "a.tif"))


GREY = np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint8)
RGB = np.array(
    [[[0, 10, 200], [255, 128, 1], [30, 60, 90]], [[1, 2, 3], [250, 251, 252], [9, 0, 77]]], dtype=np.uint8
)
ALPHA = np.array([[255, 128, 1], [0, 200, 64]], dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_8_bit_modes_in_files(fmt):
    # L and RGB are kept; 1 becomes 0/255; alpha is dropped; a palette is looked up
    assert np.array_equal(decode_image(encoded(Image.fromarray(GREY), fmt), "x"), GREY)
    assert np.array_equal(decode_image(encoded(Image.fromarray(RGB), fmt), "x"), RGB)
    bits = GREY > 127
    assert np.array_equal(decode_image(encoded(Image.fromarray(bits), fmt), "x"), bits * np.uint8(255))
    grey_alpha = Image.fromarray(np.stack([GREY, ALPHA], axis=2), "LA")
    assert np.array_equal(decode_image(encoded(grey_alpha, fmt), "x"), GREY)
    rgba = Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], axis=2), "RGBA")
    assert np.array_equal(decode_image(encoded(rgba, fmt), "x"), RGB)
    palette = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8), "P")
    colours = [[255, 0, 0], [0, 128, 255], [7, 8, 9]]
    palette.putpalette([v for colour in colours for v in colour])
    expected = np.array(colours, dtype=np.uint8)[[[0, 1, 2], [2, 1, 0]]]
    assert np.array_equal(decode_image(encoded(palette, fmt), "x"), expected)


def test_colour_modes_in_tiff_files():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [10, 100, 200, 50]]], dtype=np.uint8)
    got = decode_image(encoded(Image.fromarray(cmyk, "CMYK"), "TIFF"), "x")
    ink = cmyk[..., :3].astype(np.float64)
    assert np.array_equal(got, round_half_up((255 - ink) * (255 - cmyk[..., 3:].astype(np.float64)) / 255))
    ycbcr = np.array([[[100, 50, 20], [128, 128, 128], [200, 100, 160]]], dtype=np.uint8)
    got = decode_image(encoded(Image.fromarray(ycbcr, "YCbCr"), "TIFF"), "x").astype(np.float64)
    y, cb, cr = (ycbcr[..., i].astype(np.float64) for i in range(3))
    jfif = np.stack(
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)],
        axis=2,
    )
    assert np.abs(got - np.clip(np.round(jfif), 0, 255)).max() <= 1
    palette_alpha = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P").convert("PA")
    palette_alpha.putpalette([1, 2, 3, 4, 5, 6])
    assert decode_image(encoded(palette_alpha, "TIFF"), "x").tolist() == [[[1, 2, 3], [4, 5, 6]]]


def test_modes_only_made_in_memory():
    hsv = np.array([[[0, 255, 255], [85, 128, 200], [170, 40, 90]]], dtype=np.uint8)
    got = to_8bit(Image.fromarray(hsv, "HSV"), "x")
    expected = [[round(255 * c) for c in colorsys.hsv_to_rgb(*(pixel / 255))] for pixel in hsv[0]]
    assert got[0].tolist() == expected
    premultiplied = Image.fromarray(np.array([[[100, 50, 20, 128]]], dtype=np.uint8), "RGBa")
    assert to_8bit(premultiplied, "x").tolist() == [[[v * 255 // 128 for v in (100, 50, 20)]]]
    grey_premultiplied = Image.merge("La", [Image.new("L", (1, 1), 100), Image.new("L", (1, 1), 128)])
    assert to_8bit(grey_premultiplied, "x").tolist() == [[100 * 255 // 128]]
    padded = Image.fromarray(np.concatenate([RGB, ALPHA[..., None]], axis=2), "RGBX")
    assert np.array_equal(to_8bit(padded, "x"), RGB)


def test_16_bit_pngs_in_an_image_folder_are_scaled(tmp_path):
    root, expected = tmp_path / "ds", set()
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(3):
            pixels = np.array([[0, 65535], [32896, 257 * (10 * c + i)]], dtype=np.uint16)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
            expected.add((0, 255, 128, 10 * c + i))
    data = load_dataset(str(root), cache_dir=tmp_path / "cache")
    decoded = np.concatenate([data.train_images.numpy(), data.test_images.numpy()]).reshape(6, 4)
    assert {tuple(row) for row in decoded.tolist()} == expected


# ---------------------------------------------------------------- memory, cache warning


def test_a_resolution_beyond_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    image_tree(tmp_path / "ds", classes=2, per_class=4)
    message = one_line_data_error(
        r"at data.resolution=100000 needs at least 372.5 GiB of memory "
        r"\(8 images of 1x100000x100000 pixels\) but .* is available",
        lambda: load_dataset(str(tmp_path / "ds"), cache_dir=tmp_path / "cache", resolution=100000),
    )
    assert "choose a smaller data.resolution" in message
    monkeypatch.setattr(memory_module, "available_bytes", lambda: 10**6)
    one_line_data_error(
        "needs at least 4.7 GiB of memory .* but 976.6 KiB is available",
        lambda: memory_module.check_memory(10, 1, 10000, "x"),
    )
    memory_module.check_memory(10, 1, 100, "x")  # 0.5 MB fit


def test_mixed_sizes_at_an_absurd_resolution_are_refused_before_resizing(tmp_path):
    root = image_tree(tmp_path / "ds", classes=2, per_class=3)
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(root / "c0" / "big.png")
    one_line_data_error(
        "needs at least", lambda: load_dataset(str(root), cache_dir=tmp_path / "cache", resolution=100000)
    )


def test_available_memory_is_known_here():
    available = memory_module.available_bytes()
    assert available is None or available > 0


def test_a_failed_cache_write_names_the_cache_setting_not_out(tmp_path, monkeypatch):
    image_tree(tmp_path / "ds", classes=2, per_class=3)

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_file", no_space)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_dataset(str(tmp_path / "ds"), cache_dir=tmp_path / "cache")
    text = " ".join(str(w.message) for w in caught)
    assert "No space left on device" in text and "data.cache_dir" in text and "--out" not in text
