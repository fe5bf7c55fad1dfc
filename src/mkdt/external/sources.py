"""Readers of the sources ``mkdt import`` takes, each checked against the run's data.

Kinds (:data:`KINDS`):

- ``indices``: distinct indices into D_real (the run's training images, after ``data.pool_size``):
  ``.json`` (a list, or ``{"indices": [...]}``), ``.txt`` (integers separated by white space),
  ``.npy`` (a 1-D integer array, read without pickle), ``.pkl``/``.pickle`` (a list, tuple or
  numpy integer array, or a dict with ``indices``), read by :func:`safe_unpickle`;
- ``tensors``: images with optional targets: ``.pt``/``.pth`` (loaded with
  ``weights_only=True``: a tensor, an ``(images, targets)`` pair or a dict), ``.safetensors`` (a
  dict) or ``.npy`` (images only). Dict keys: images under one of :data:`IMAGE_KEYS`, targets under
  one of :data:`TARGET_KEYS` (KRR-ST releases ``x_syn``/``y_syn``). Images are (n, C, H, W) or
  (n, H, W, C) with the run's channels and size; their pixel scale is stated (:data:`SCALES`) and
  checked by :func:`check_scale`;
- ``folder``: image files (PNG, JPEG, ...) under a folder, flat or in class subfolders, taken in
  the sorted order of their relative paths (links as :func:`mkdt.data.walk.walk_tree` follows
  them; pixels by the rule of :func:`mkdt.data.decode.to_8bit`, e.g. 16-bit v -> round(v / 257));
  a ``targets.safetensors`` in the folder (tensor ``targets``, one row per file in that order, as
  ``mkdt export`` writes) gives their targets;
- ``run``: another mkdt run directory's distilled set (``distill/synthetic.safetensors``).

Image tensors of any integer dtype hold uint8 pixels when their values lie in [0, 255]; wider
values are refused with the rule that maps 16 bits to 8. Imported images are never resized or
converted between RGB and grayscale (grayscale files in a folder are repeated to RGB for an RGB
run): a size or channel mismatch is refused. Every problem with a source raises
:class:`DataError` (one line); nothing a source holds can run code.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mkdt.data import ImageData
from mkdt.data.decode import IMAGE_SUFFIXES, decode_image, read_bytes, reason
from mkdt.data.walk import Parts, walk_tree
from mkdt.errors import ArtifactError, ConfigError, DataError
from mkdt.files import file_sha256, read_metadata
from mkdt.store import RunDir

KINDS = ("indices", "tensors", "folder", "run")
SCALES = ("normalized", "unit", "uint8")
SCALE_HELP = (
    "--scale uint8: integers in [0, 255]; unit: floats in [0, 1]; normalized: (pixel / 255 - mean) "
    "/ std with the dataset's mean and std, roughly zero-mean with negative values"
)
_SIXTEEN_BIT_HELP = (
    "mkdt takes 8-bit pixels: scale wider ones first, e.g. 16-bit ones to round(value / 257) as "
    "uint8 (as it decodes 16-bit image files) or to value / 65535 with --scale unit"
)
IMAGE_KEYS = ("images", "x_syn", "x", "inputs", "data")
TARGET_KEYS = ("targets", "y_syn", "y")
FOLDER_TARGETS = "targets.safetensors"
INDEX_SUFFIXES = (".json", ".txt", ".pkl", ".pickle")
TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors")
_MAX_NORMALIZED_MEAN = 2.0


@dataclass
class Found:
    """A source in the run's terms: ``images`` (n, C, H, W) float32 on the CPU, normalised like
    D_real; the (n, D) ``targets`` it holds (None: none) and where they come from; its learned
    step size (None: it has none, the evaluation uses ``evaluate.lr``)."""

    images: torch.Tensor
    targets: torch.Tensor | None = None
    lr: float | None = None
    targets_from: str = "the source"


# ---------------------------------------------------------------- kind and identity


def infer_kind(source: Path) -> str:
    """The kind of a source from its name (and, for ``.npy``, its number of dimensions): a folder
    holding ``distill/synthetic.safetensors`` or ``manifest.json`` is a run, any other folder an
    image folder."""
    if source.is_dir():
        store = RunDir(source)
        return "run" if store.synthetic_path.is_file() or store.manifest_path.is_file() else "folder"
    suffix = source.suffix.lower()
    if suffix == ".npy":
        return "indices" if _read_npy(source, mmap=True).ndim == 1 else "tensors"
    if suffix in INDEX_SUFFIXES:
        return "indices"
    if suffix in TENSOR_SUFFIXES:
        return "tensors"
    raise ConfigError(
        f"cannot tell the kind of {source} from its name; pass --kind {'|'.join(KINDS)} "
        f"(indices: {'/'.join(INDEX_SUFFIXES)}/.npy; tensors: {'/'.join(TENSOR_SUFFIXES)}/.npy)"
    )


def source_files(source: Path, kind: str) -> list[Path]:
    """The files whose bytes make up a source: the file itself, a folder's images and targets,
    a run's distilled set."""
    if kind == "run":
        return [RunDir(source).synthetic_path]
    if kind == "folder":
        targets = source / FOLDER_TARGETS
        return [*_image_files(source), *([targets] if targets.is_file() else [])]
    return [source]


def source_sha256(source: Path, files: list[Path]) -> str:
    """sha256 of a source: of the file itself, or of the lines "relative path, file sha256" of
    the files of a folder."""
    if files == [source]:
        return file_sha256(source)
    lines = "".join(f"{f.relative_to(source).as_posix()}\t{file_sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------- indices


def read_indices(path: Path, num_real: int) -> torch.Tensor:
    """The (n,) int64 indices of an index file, checked: integers, distinct, in [0, num_real)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            values = json.loads(read_bytes(path))
        except (ValueError, RecursionError) as err:  # RecursionError: lists nested too deeply
            raise DataError(f"cannot read {path} as JSON ({reason(err)})") from None
    elif suffix == ".txt":
        values = _text_indices(path, num_real)
    elif suffix == ".npy":
        values = _read_npy(path)
    elif suffix in (".pkl", ".pickle"):
        values = safe_unpickle(read_bytes(path), str(path))
    else:
        raise DataError(f"{path}: index lists are .json, .txt, .npy or .pkl files")
    if isinstance(values, dict):
        if "indices" not in values:
            raise DataError(f"{path} holds a dict without the key 'indices' (keys: {sorted(values)[:5]})")
        values = values["indices"]
    return check_indices(_as_index_array(values, path, num_real), path)


def _out_of_range(path: Path, index: object, num_real: int) -> DataError:
    """The error for an index outside [0, num_real) (a huge one shown by its first digits)."""
    shown = str(index) if len(str(index)) <= 24 else f"{str(index)[:20]}... ({len(str(index))} digits)"
    return DataError(
        f"{path}: index {shown} is out of range; D_real has {num_real} images (indices 0-{num_real - 1})"
    )


def _text_indices(path: Path, num_real: int) -> list[int]:
    """The integers of a text file, separated by white space (e.g. one per line)."""
    numbers = []
    for word in read_bytes(path).decode("utf-8", errors="replace").split():
        try:
            numbers.append(int(word))
        except ValueError:
            if re.fullmatch(r"[+-]?[0-9]+", word):  # more digits than Python converts
                raise _out_of_range(path, word, num_real) from None
            raise DataError(
                f"{path} holds {word[:20]!r}, not an integer; expected indices into D_real"
            ) from None
    return numbers


def _as_index_array(values: Any, path: Path, num_real: int) -> np.ndarray:
    """A list, tuple or numpy array of integers as a 1-D int64 array (bools and floats refused;
    a value outside [0, num_real) refused before conversion, however large)."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise DataError(f"{path} holds a {values.ndim}-D {values.dtype} array; expected 1-D integers")
        beyond = values[(values < 0) | (values >= num_real)]
        if len(beyond):
            raise _out_of_range(path, beyond[0], num_real)
        return values.astype(np.int64)
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{path} holds a {type(values).__name__}; expected a list of indices into D_real")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise DataError(f"{path} holds {bad[0]!r} ({type(bad[0]).__name__}); indices must be integers")
    first_outside = next((v for v in values if not 0 <= v < num_real), None)
    if first_outside is not None:
        raise _out_of_range(path, first_outside, num_real)
    return np.asarray(values, dtype=np.int64)


def check_indices(indices: np.ndarray, path: Path) -> torch.Tensor:
    """In-range ``indices`` (:func:`_as_index_array`) as an int64 tensor when non-empty and
    distinct."""
    if len(indices) == 0:
        raise DataError(f"{path} holds no indices")
    values, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        twice = values[counts > 1]
        raise DataError(
            f"{path}: index {twice[0]} appears {counts[counts > 1][0]} times"
            f"{f' ({len(twice)} indices repeat)' if len(twice) > 1 else ''}; indices must be distinct"
        )
    return torch.from_numpy(indices.copy())


def _read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array read without pickle (object arrays are refused)."""
    try:
        array: np.ndarray = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"cannot read {path} as a .npy array without pickle ({reason(err)})") from None
    return array


# ---------------------------------------------------------------- restricted unpickling


_NUMPY_GLOBALS = frozenset(
    [("numpy", "ndarray"), ("numpy", "dtype")]
    + [
        (f"{package}.{module}", name)
        for package in ("numpy.core", "numpy._core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    ]
)


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """What pickle protocol 2 calls as ``_codecs.encode`` to rebuild bytes (latin-1 only)."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"it encodes bytes as {encoding!r}")
    return codecs.encode(text, "latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds lists, tuples, dicts, numbers, strings and numpy arrays only:
    every other global (functions, classes, modules) is refused before anything is called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def safe_unpickle(data: bytes, where: str) -> Any:
    """The object a pickle holds, when it is built only of lists, tuples, dicts, numbers,
    strings and numpy arrays (not object arrays); anything else raises DataError, without running
    any of the pickle's code."""
    try:
        value = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # a bad pickle raises many types
        raise DataError(
            f"refused to unpickle {where} ({reason(err)}); mkdt unpickles only lists, tuples, "
            "dicts, numbers, strings and numpy arrays: save the indices as .json, .txt or .npy"
        ) from None
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        raise DataError(f"refused to unpickle {where} (an object array); save the indices as .json or .npy")
    return value


# ---------------------------------------------------------------- tensors


def read_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, targets or None) of a tensor file, as stored (layout and scale unchecked)."""
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            found = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad or unsafe file
            raise DataError(
                f"cannot load {path} with torch.load(weights_only=True) ({reason(err)}); "
                "save plain tensors (no classes), or use .safetensors"
            ) from None
    elif suffix == ".safetensors":
        try:
            found = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise DataError(f"cannot read {path} as safetensors ({reason(err)})") from None
    elif suffix == ".npy":
        found = _npy_tensor(path)
    else:
        raise DataError(f"{path}: image tensors are .pt, .pth, .safetensors or .npy files")
    return _images_and_targets(found, path)


def _npy_tensor(path: Path) -> torch.Tensor:
    """A ``.npy`` array of numbers (in either byte order) as a tensor; other arrays (strings,
    records, dates) raise DataError."""
    array = _read_npy(path)
    if array.dtype.kind not in "biufc":
        raise DataError(f"{path} holds a {array.dtype} array; expected numbers (pixel values)")
    return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("=")))


def _unusual_kind(tensor: torch.Tensor) -> str | None:
    """What makes a tensor other than a plain dense one with data (None: nothing)."""
    if tensor.is_nested:
        return "nested"
    if tensor.layout != torch.strided:
        return str(tensor.layout).removeprefix("torch.")
    if tensor.is_quantized:
        return "quantized"
    if tensor.is_meta:
        return "meta (data-less)"
    return None


def _images_and_targets(found: Any, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split what a tensor file holds: a tensor, an (images, targets) pair, or a dict with images
    under one of IMAGE_KEYS and targets under one of TARGET_KEYS."""
    if isinstance(found, (list, tuple)) and len(found) in (1, 2):
        images, targets = found[0], found[1] if len(found) == 2 else None
    elif isinstance(found, dict):
        key = next((k for k in IMAGE_KEYS if k in found), None)
        if key is None:
            raise DataError(
                f"{path} holds keys {sorted(map(str, found))[:6]}; put the images under one of "
                f"{', '.join(IMAGE_KEYS)} (targets under {', '.join(TARGET_KEYS)})"
            )
        images, targets = found[key], next((found[k] for k in TARGET_KEYS if k in found), None)
    else:
        images, targets = found, None
    for what, value in (("images", images), ("targets", targets)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: the {what} are a {type(value).__name__}, not a tensor")
        if value is not None and (kind := _unusual_kind(value)) is not None:
            raise DataError(f"{path}: the {what} are a {kind} tensor; save a plain dense tensor")
    return images, targets


def to_nchw(images: torch.Tensor, data: ImageData, where: str) -> torch.Tensor:
    """(n, C, H, W) images from (n, C, H, W) or (n, H, W, C) with D_real's channels and size."""
    c, s = data.channels, data.image_size
    shape = tuple(images.shape)
    if len(shape) == 4 and shape[0] > 0 and shape[1:] == (c, s, s):
        return images
    if len(shape) == 4 and shape[0] > 0 and shape[1:] == (s, s, c):
        return images.permute(0, 3, 1, 2).contiguous()
    raise DataError(
        f"{where} holds images of shape {shape}, which fit neither (n, {c}, {s}, {s}) nor "
        f"(n, {s}, {s}, {c}) of the run's {c}-channel {s}x{s} images; mkdt does not resize or "
        "convert imported images: resize them first"
    )


def _comparable(images: torch.Tensor) -> torch.Tensor:
    """Images in a dtype that torch compares and reduces: 8-bit floats as float32, unsigned
    16-, 32- and 64-bit integers as float64 (exact up to 2**53, enough to judge a scale)."""
    if images.is_floating_point() and images.dtype.itemsize == 1:
        return images.float()
    if images.dtype in (torch.uint16, torch.uint32, torch.uint64):
        return images.double()
    return images


def check_scale(images: torch.Tensor, scale: str, where: str) -> None:
    """DataError when the values contradict the stated scale: uint8 needs integers in [0, 255]
    (of any integer or float dtype), unit floats in [0, 1], normalized floats with negative values
    and a mean within +-2. 16-bit pixels are refused with the rule that scales them to 8 bits."""
    if images.dtype == torch.bool or images.is_complex():
        raise DataError(f"{where} holds {images.dtype} images; expected pixel values ({SCALE_HELP})")
    floating = images.is_floating_point()
    values = _comparable(images)
    if floating and not torch.isfinite(values).all():
        raise DataError(f"{where} holds non-finite pixel values")
    lo, hi = float(values.min()), float(values.max())
    shown = f"{lo:.4g}, {hi:.4g}" if floating else f"{int(lo)}, {int(hi)}"
    seen = f"{images.dtype} values in [{shown}]"
    if scale == "uint8":
        integral = not floating or bool((values == values.round()).all())
        ok = integral and lo >= 0 and hi <= 255
        seen += "" if integral else ", not all integers"
    elif scale == "unit":
        ok = floating and lo >= 0 and hi <= 1
    else:
        mean = float(values.float().mean())
        ok = floating and lo < 0 and abs(mean) <= _MAX_NORMALIZED_MEAN
        seen += f", mean {mean:.3g}"
    if not ok:
        sixteen_bit = scale == "uint8" and not floating and lo >= 0 and 255 < hi <= 65535
        raise DataError(
            f"{where} does not look like {scale} images ({seen}); "
            + (_SIXTEEN_BIT_HELP if sixteen_bit else SCALE_HELP)
        )


def normalized(images: torch.Tensor, scale: str, data: ImageData) -> torch.Tensor:
    """(n, C, H, W) images of a checked scale as float32 normalised like D_real."""
    if scale == "normalized":
        return images.float()
    pixels = images.float() if scale == "uint8" else images.float() * 255
    return data.normalize(pixels)


def tensor_source(path: Path, scale: str, data: ImageData) -> Found:
    """A tensor file's images (checked layout and scale) and targets."""
    images, targets = read_tensors(path)
    images = to_nchw(images, data, str(path))
    check_scale(images, scale, str(path))
    return Found(normalized(images, scale, data), targets)


# ---------------------------------------------------------------- folders


def _visible_image(parts: Parts, is_dir: bool) -> bool:
    """Whether the walk lists a relative path: folders and image files, none of them hidden."""
    return not parts[-1].startswith(".") and (is_dir or parts[-1].lower().endswith(IMAGE_SUFFIXES))


def _image_files(root: Path) -> list[Path]:
    """Visible image files under root (any depth, links as :func:`walk_tree` follows them), sorted
    by relative path."""
    files = [entry for entry in walk_tree(root, _visible_image) if not entry.is_dir and entry.path.is_file()]
    return [entry.path for entry in sorted(files, key=lambda entry: "/".join(entry.parts))]


def _decode(path: Path, channels: int) -> np.ndarray:
    """One image file as a (channels, H, W) uint8 array; grayscale is repeated to RGB, colour
    for a grayscale run is refused."""
    array = decode_image(read_bytes(path), str(path))
    if array.ndim == 3 and channels == 1:
        raise DataError(f"{path} is a colour image but the run's images are grayscale")
    if array.ndim == 2:
        return np.repeat(array[None], channels, axis=0)
    return array.transpose(2, 0, 1)


def folder_source(root: Path, data: ImageData) -> Found:
    """The images of a folder (uint8 files, checked against D_real's size) and the targets of its
    ``targets.safetensors`` if present."""
    files = _image_files(root)
    if not files:
        raise DataError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) found under {root}")
    arrays = [_decode(path, data.channels) for path in files]
    sizes = {a.shape[1:] for a in arrays}
    if len(sizes) > 1:
        (h1, w1), (h2, w2) = sorted(sizes)[:2]
        raise DataError(
            f"images under {root} have different sizes (e.g. {w1}x{h1} and {w2}x{h2}); mkdt does not "
            f"resize imported images: make them all {data.image_size}x{data.image_size}"
        )
    images = to_nchw(torch.from_numpy(np.stack(arrays)), data, str(root))
    targets_path = root / FOLDER_TARGETS
    return Found(data.normalize(images), _folder_targets(targets_path) if targets_path.is_file() else None)


def _folder_targets(path: Path) -> torch.Tensor:
    """The ``targets`` tensor of a folder's targets.safetensors."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise DataError(f"cannot read {path} as safetensors ({reason(err)})") from None
    if "targets" not in tensors:
        raise DataError(f"{path} holds no tensor named targets (found {sorted(tensors)[:5]})")
    return tensors["targets"]


# ---------------------------------------------------------------- runs


def run_source(root: Path, data: ImageData) -> Found:
    """Another run's distilled set: its images (mapped to pixels with that run's mean and std and
    normalised with D_real's when they differ), its targets and its learned step size."""
    store = RunDir(root)
    try:
        synthetic, meta = store.load_synthetic(), read_metadata(store.synthetic_path)
    except ArtifactError as err:
        raise DataError(
            f"{root} holds no readable distilled set ({err}); finish its `mkdt distill`"
        ) from None
    images = to_nchw(synthetic.images, data, str(store.synthetic_path))
    if "mean" not in meta or "std" not in meta:
        raise DataError(f"{store.synthetic_path} has no mean/std in its metadata")
    if (tuple(meta["mean"]), tuple(meta["std"])) == (data.mean, data.std):
        return Found(images.float(), synthetic.targets, synthetic.lr)
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(1, -1, 1, 1)
    pixels = (images.float() * std + mean) * 255
    return Found(data.normalize(pixels), synthetic.targets, synthetic.lr)
