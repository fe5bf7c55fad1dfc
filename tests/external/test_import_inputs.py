"""`mkdt import` on unusual inputs: dtypes, byte orders, huge or nested index lists, image modes, links."""

from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mkdt.errors import DataError
from tests.external.test_external import INDICES, _import, _loaded, _one_line_error, _save_png, setting

__all__ = ["setting"]  # the shared run (teacher and targets) of test_external, as a fixture here


def test_integer_images_of_any_width_within_0_255_import_as_uint8(setting, tmp_path):
    s = setting
    pixels = s.real.images[INDICES]  # uint8 (n, 1, 8, 8)
    for dtype in (np.uint16, np.uint32, np.uint64, np.int16, np.int32, np.int64):
        np.save(tmp_path / "set.npy", pixels.numpy().astype(dtype))
        _import(s, "wide", tmp_path / "set.npy", scale="uint8", force=True)
        assert torch.equal(_loaded(s, "wide").images, s.real.inputs[INDICES]), dtype
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        save_file({"images": pixels.to(dtype)}, str(tmp_path / "set.safetensors"))
        _import(s, "wide", tmp_path / "set.safetensors", scale="uint8", force=True)
        assert torch.equal(_loaded(s, "wide").images, s.real.inputs[INDICES]), dtype
        torch.save(pixels.to(dtype), tmp_path / "set.pt")
        _import(s, "wide", tmp_path / "set.pt", scale="uint8", force=True)
        assert torch.equal(_loaded(s, "wide").images, s.real.inputs[INDICES]), dtype


def test_16_bit_and_wider_values_are_refused_with_the_scaling_rule(setting, tmp_path):
    sixteen = setting.real.images[INDICES].numpy().astype(np.uint16) * 257
    np.save(tmp_path / "set.npy", sixteen)
    _one_line_error(
        DataError,
        r"uint16 values in \[0, 65535\]\); mkdt takes 8-bit pixels: .*round\(value / 257\)",
        lambda: _import(setting, "bad", tmp_path / "set.npy", scale="uint8"),
    )
    save_file(
        {"images": torch.full((2, 1, 8, 8), 2**40, dtype=torch.uint64)}, str(tmp_path / "set.safetensors")
    )
    _one_line_error(
        DataError,
        "does not look like uint8 images",
        lambda: _import(setting, "bad", tmp_path / "set.safetensors", scale="uint8"),
    )


def test_low_precision_floats_and_big_endian_arrays_are_read(setting, tmp_path):
    s, unit = setting, setting.real.images[INDICES].float() / 255
    for dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float16):
        save_file({"images": unit.to(dtype)}, str(tmp_path / "set.safetensors"))
        _import(s, "low", tmp_path / "set.safetensors", scale="unit", force=True)
        expected = s.real.data.normalize(unit.to(dtype).float() * 255)
        assert torch.equal(_loaded(s, "low").images, expected), dtype
    np.save(tmp_path / "big.npy", unit.numpy().astype(">f4"))
    _import(s, "big", tmp_path / "big.npy", scale="unit")
    assert torch.allclose(_loaded(s, "big").images, s.real.inputs[INDICES], atol=1e-5)
    targets = torch.randn(len(INDICES), s.z.shape[1]).to(torch.float8_e5m2)
    torch.save({"images": unit, "targets": targets}, tmp_path / "t8.pt")
    assert _import(s, "t8", tmp_path / "t8.pt", scale="unit")["targets"] == "the source"
    assert torch.equal(_loaded(s, "t8").targets, targets.float())


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("strings.npy", np.full((2, 1, 8, 8), "a"), "holds a <U1 array; expected numbers"),
        ("records.npy", np.zeros((2, 1, 8, 8), dtype=[("a", "f4")]), r"holds a \[\('a', '<f4'\)\] array"),
        ("dates.npy", np.zeros((2, 1, 8, 8), dtype="datetime64[s]"), "holds a datetime64"),
        ("sparse.pt", lambda: torch.zeros(2, 1, 8, 8).to_sparse(), "the images are a sparse_coo tensor"),
        ("meta.pt", lambda: torch.zeros(2, 1, 8, 8, device="meta"), "the images are a meta"),
        (
            "quantized.pt",
            lambda: torch.quantize_per_tensor(torch.zeros(2, 1, 8, 8), 0.1, 0, torch.quint8),
            "quantized",
        ),
        (
            "sparse-targets.pt",
            lambda: {"x": torch.rand(2, 1, 8, 8), "y": torch.ones(2, 4).to_sparse()},
            "the targets are",
        ),
    ],
)
def test_tensor_files_that_are_not_plain_numbers_are_refused(setting, tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        with warnings.catch_warnings():  # torch warns that quantization and sparse loading are in flux
            warnings.simplefilter("ignore")
            torch.save(content(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_line_error(DataError, match, lambda: _import(setting, "bad", path, scale="unit"))


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("huge.json", "[1, 99999999999999999999999]", "index 99999999999999999999999 is out of range"),
        ("negative.json", '{"indices": [-99999999999999999999999]}', "index -9999.* is out of range"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "cannot read .* as JSON .*recursion"),
        (
            "digits.txt",
            "1 " + "9" * 5000,
            r"index 99999999999999999999\.\.\. \(5000 digits\) is out of range",
        ),
        ("huge.txt", "3 99999999999999999999999", "index 99999999999999999999999 is out of range"),
        ("superscript.txt", "1 2 \u00b2", "holds '\u00b2', not an integer"),
        ("signs.txt", "1 +-2", "holds '\\+-2', not an integer"),
        (
            "uint64.npy",
            np.array([1, 2**63 + 5], dtype=np.uint64),
            "index 9223372036854775813 is out of range",
        ),
    ],
)
def test_index_lists_beyond_int64_or_nested_too_deeply_are_one_line_errors(
    setting, tmp_path, name, content, match
):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    else:
        path.write_text(content)
    _one_line_error(DataError, match, lambda: _import(setting, "bad", path, kind="indices"))


def test_a_folder_of_16_bit_pngs_is_scaled_to_the_same_pixels(setting, tmp_path):
    s, pixels = setting, setting.real.images[INDICES, 0].numpy()
    for i, image in enumerate(pixels):
        _save_png(tmp_path / "sixteen" / f"{i:02d}.png", image.astype(np.uint16) * 257)
    _import(s, "sixteen", tmp_path / "sixteen")
    assert torch.equal(_loaded(s, "sixteen").images, s.real.inputs[INDICES])


def test_folders_with_refused_modes_or_links_back_inside_are_one_line_errors(setting, tmp_path):
    s, pixels = setting, setting.real.images[INDICES, 0].numpy()
    for i, image in enumerate(pixels[:3]):
        _save_png(tmp_path / "set" / f"{i:02d}.png", image)
    os.symlink("..", tmp_path / "set" / "up")
    _one_line_error(
        DataError, "link .*up points to .*loop forever", lambda: _import(s, "bad", tmp_path / "set")
    )
    os.unlink(tmp_path / "set" / "up")
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 70000, dtype=np.int32)).save(buffer, "TIFF")
    (tmp_path / "set" / "wide.png").write_bytes(buffer.getvalue())  # a TIFF under a .png name
    _one_line_error(
        DataError, "wide.png has 32-bit or signed integer pixels", lambda: _import(s, "bad", tmp_path / "set")
    )
    assert not s.run.imported_path("bad").exists()


def test_a_folder_linked_from_elsewhere_is_read_once(setting, tmp_path):
    s, pixels = setting, setting.real.images[INDICES, 0].numpy()
    for i, image in enumerate(pixels):
        _save_png(tmp_path / "disk" / f"{i:02d}.png", image)
    (tmp_path / "set").mkdir()
    os.symlink(tmp_path / "disk", tmp_path / "set" / "linked")
    meta = _import(s, "linked", tmp_path / "set")
    assert meta["images"] == len(INDICES)
    assert torch.equal(_loaded(s, "linked").images, s.real.inputs[INDICES])
    assert json.dumps(meta)  # the metadata is plain JSON
