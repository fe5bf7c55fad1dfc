"""Fault suite, data cases: bad folders, image modes, sizes and import sources give one line, change nothing.

Every case of ``BAD_DATA`` runs the CLI in-process (``mkdt run`` or ``mkdt import``) against a tiny
run directory whose teacher and targets stages are finished, and asserts exit code 2, exactly one
``mkdt: error:`` line on stderr holding the case's fragment, no traceback, and every file of the
run directory byte-identical afterwards. Each case is the smallest input that shows its class of
fault; those that could hang (link cycles) run under a time limit.
"""

from __future__ import annotations

import io
import os
import signal
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mkdt.cli import main
from tests.system.test_faults import _args, _image_folder, _snapshot, _write


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny run directory (root/run) with the teacher and targets stages finished."""
    root = tmp_path_factory.mktemp("faults-data")
    for stage in ("teacher", "targets"):
        assert main([stage, "--out", str(root / "run"), *_args(root)]) == 0
    return root


def _tree(root: Path, name: str) -> Path:
    """A fresh two-class ImageFolder tree of 8x8 grey PNGs under root/name."""
    return _image_folder(root / name, 2)


def _linked(root: Path, name: str, links: dict[str, str]) -> list[str]:
    """A tree with the given links (relative path -> target) as the run's dataset."""
    tree = _tree(root, name)
    for link, target in links.items():
        os.symlink(target, tree / link)
    return [f"data.name={tree}"]


def _twice_outside(root: Path) -> list[str]:
    outside = _tree(root, "twice-outside-disk") / "class0"
    return _linked(root, "twice", {"class2": str(outside), "class3": str(outside)})


def _loop_outside(root: Path) -> list[str]:
    outside = _tree(root, "loop-outside-disk") / "class0"
    os.symlink("..", outside / "back")
    return _linked(root, "loop-outside", {"class2": str(outside)})


def _tiff(array: np.ndarray | None = None, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, (8, 8)) if mode else Image.fromarray(array)
    image.save(buffer, "TIFF")
    return buffer.getvalue()


def _with_image(root: Path, name: str, data: bytes) -> list[str]:
    """A tree with one more image (TIFF bytes under a .png name, as mislabelled files are)."""
    tree = _tree(root, name)
    _write(tree / "class0" / "odd.png", data)
    return [f"data.name={tree}"]


def _mixed_sizes(root: Path) -> list[str]:
    tree = _tree(root, "mixed")
    Image.fromarray(np.zeros((9, 9), dtype=np.uint8)).save(tree / "class1" / "big.png")
    return [f"data.name={tree}", "data.resolution=100000"]


def _save_torch(path: Path, make: Callable[[], object]) -> Path:
    with warnings.catch_warnings():  # torch warns that quantized and sparse tensors are in flux
        warnings.simplefilter("ignore")
        torch.save(make(), path)
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def _imported_folder(root: Path, name: str, extra: Callable[[Path], None]) -> Path:
    folder = root / name
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(folder / f"{i}.png")
    extra(folder)
    return folder


# (case id, message fragment, command, setup(root) -> arguments): "run" cases give overrides for
# `mkdt run`, "import" cases NAME SOURCE [options] for `mkdt import`
Setup = Callable[[Path], list[str]]
BAD_DATA: list[tuple[str, str, str, Setup]] = [
    (
        "link to the dataset in a class folder",
        "loop forever",
        "run",
        lambda r: _linked(r, "up", {"class0/up": ".."}),
    ),
    (
        "link cycle in every class folder",
        "loop forever",
        "run",
        lambda r: _linked(r, "cycles", {f"class{c}/up": ".." for c in range(2)}),
    ),
    (
        "link to a folder above the dataset",
        "loop forever",
        "run",
        lambda r: _linked(r, "top", {"top": "../.."}),
    ),
    (
        "link to another class folder",
        "read twice, under two labels",
        "run",
        lambda r: _linked(r, "sib", {"class0/x": "../class1"}),
    ),
    (
        "link to another image",
        "read twice",
        "run",
        lambda r: _linked(r, "file", {"class0/x.png": "../class1/0.png"}),
    ),
    ("two links to one outside folder", "lead to the same folder", "run", _twice_outside),
    ("link loop outside the dataset", "holds the link", "run", _loop_outside),
    (
        "32-bit integer image",
        "32-bit or signed integer pixels",
        "run",
        lambda r: _with_image(r, "int32", _tiff(np.full((8, 8), 70000, dtype=np.int32))),
    ),
    (
        "float image beyond [0, 1]",
        "only in [0, 1]",
        "run",
        lambda r: _with_image(r, "float", _tiff(np.full((8, 8), 2.5, dtype=np.float32))),
    ),
    (
        "NaN float image",
        "NaN or infinite values",
        "run",
        lambda r: _with_image(r, "nan", _tiff(np.full((8, 8), np.nan, dtype=np.float32))),
    ),
    ("CIELAB image", "CIELAB", "run", lambda r: _with_image(r, "lab", _tiff(mode="LAB"))),
    ("resolution of 100000", "needs at least", "run", lambda r: ["data.resolution=100000"]),
    ("resolution of 100000 for mixed sizes", "needs at least", "run", _mixed_sizes),
    (
        "uint16 image tensors",
        "round(value / 257)",
        "import",
        lambda r: [
            "u16",
            str(_npy(r / "u16.npy", np.full((2, 1, 8, 8), 60000, dtype=np.uint16))),
            "--scale=uint8",
        ],
    ),
    (
        "string image tensors",
        "expected numbers",
        "import",
        lambda r: ["str", str(_npy(r / "str.npy", np.full((2, 1, 8, 8), "a"))), "--scale=unit"],
    ),
    (
        "record image tensors",
        "expected numbers",
        "import",
        lambda r: [
            "rec",
            str(_npy(r / "rec.npy", np.zeros((2, 1, 8, 8), dtype=[("a", "f4")]))),
            "--scale=unit",
        ],
    ),
    (
        "sparse image tensor",
        "sparse_coo tensor",
        "import",
        lambda r: [
            "sp",
            str(_save_torch(r / "sp.pt", lambda: torch.ones(2, 1, 8, 8).to_sparse())),
            "--scale=unit",
        ],
    ),
    (
        "quantized image tensor",
        "quantized tensor",
        "import",
        lambda r: [
            "q",
            str(
                _save_torch(
                    r / "q.pt",
                    lambda: torch.quantize_per_tensor(torch.ones(2, 1, 8, 8), 0.1, 0, torch.quint8),
                )
            ),
            "--scale=uint8",
        ],
    ),
    (
        "index beyond int64 in JSON",
        "index 99999999999999999999999 is out of range",
        "import",
        lambda r: ["big", str(_write(r / "big.json", "[1, 99999999999999999999999]"))],
    ),
    (
        "deeply nested JSON",
        "as JSON",
        "import",
        lambda r: ["deep", str(_write(r / "deep.json", "[" * 100_000 + "]" * 100_000))],
    ),
    (
        "index of 5000 digits in text",
        "(5000 digits) is out of range",
        "import",
        lambda r: ["digits", str(_write(r / "digits.txt", "9" * 5000))],
    ),
    (
        "superscript digit in text",
        "not an integer",
        "import",
        lambda r: ["sup", str(_write(r / "sup.txt", "1 \u00b2"))],
    ),
    (
        "uint64 index beyond int64",
        "index 9223372036854775813 is out of range",
        "import",
        lambda r: ["u64", str(_npy(r / "u64.npy", np.array([2**63 + 5], dtype=np.uint64)))],
    ),
    (
        "link cycle in an imported folder",
        "loop forever",
        "import",
        lambda r: ["loop", str(_imported_folder(r, "imp-loop", lambda f: os.symlink("..", f / "up")))],
    ),
    (
        "32-bit integer image in an imported folder",
        "32-bit or signed integer pixels",
        "import",
        lambda r: [
            "wide",
            str(
                _imported_folder(
                    r, "imp-wide", lambda f: _write(f / "w.png", _tiff(np.ones((8, 8), dtype=np.int32)))
                )
            ),
        ],
    ),
]


class _Hung(BaseException):
    """The time limit's exception: not an OSError (which a walk may swallow) nor an Exception
    (which the CLI may turn into an error line)."""


def _expire(_signum, _frame):
    raise _Hung("the command did not end: a walk does not terminate")


@pytest.mark.parametrize("case, fragment, command, setup", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_gives_one_line_and_changes_nothing(prepared, case, fragment, command, setup, capsys):
    arguments = setup(prepared)
    run = prepared / "run"
    before = _snapshot(run)
    argv = ["run", *arguments] if command == "run" else ["import", *arguments]
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(60)
    try:
        code = main([*argv, "--out", str(run), *_args(prepared)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mkdt: error:")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert _snapshot(run) == before


def test_there_are_at_least_15_bad_data_cases():
    assert len(BAD_DATA) >= 15
