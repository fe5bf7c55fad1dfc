"""``mkdt export RUN --to DIR [--set mkdt|mtt_ssl|krr_st|ext:NAME]``: a run's pre-training set as PNG files.

Layout of ``DIR`` (:data:`README`), an ImageFolder tree with one folder (a distilled set has no
labels)::

    DIR/images/000000.png, 000001.png, ...   the images, uint8: round(clamp(x * std + mean, 0, 1) * 255)
    DIR/targets.safetensors                  ``targets`` (n, D) float32, row i for file i
    DIR/README.md                            this format

``targets.safetensors`` also holds, in its ``mkdt`` metadata, the run, the set, its lr, the
``mean``/``std`` and how many pixels were clipped to [0, 1]. ``mkdt import NAME DIR --out RUN``
reads the folder back (with its targets): the normalised images equal the exported ones after
rounding to uint8, within half a grey level. DIR is written to a hidden folder beside it
(``.DIR.<host>.<pid>.<random>.tmp``) and renamed into place when complete; the hidden folders that
killed exports left beside DIR are removed by the next export there. An existing non-empty DIR, or
one that cannot be written, is refused before anything is written.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mkdt.errors import ArtifactError, ConfigError
from mkdt.files import (
    check_writable_folder,
    load_tensors,
    remove_orphaned_siblings,
    save_tensors,
    temp_sibling,
    write_error,
    write_text,
)
from mkdt.methods import is_method, parse_method
from mkdt.store import RunDir

SUMMARY = "write a run's pre-training set as PNG files plus targets.safetensors (readable by mkdt import)"
README = """# Pre-training set exported by mkdt

- `images/NNNNNN.png`: the images, in order ({count} files, {channels}, {size}x{size} pixels). They
  are the set's normalised images x mapped to pixels, round(clamp(x * std + mean, 0, 1) * 255),
  with mean = {mean} and std = {std} ({clipped} values were clipped to [0, 1]).
- `targets.safetensors`: tensor `targets` ({count}, {dim}) float32, the regression targets of the
  images, row i for the i-th file in sorted order; its metadata (`mkdt`) holds the source run, the
  set's name and its pre-training learning rate ({lr:.6g}).

The folder is an ImageFolder tree with a single class folder, `images` (the set has no labels).
Source: set `{set_name}` of the run `{run}`. Read it back into a run with
`mkdt import NAME {to} --out RUN` (the targets are picked up; the images are pre-trained at the
run's evaluate.lr).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mkdt export``'s arguments."""
    parser.add_argument("run", metavar="RUN", help="the run directory")
    parser.add_argument("--to", metavar="DIR", required=True, help="new (or empty) folder to write")
    parser.add_argument(
        "--set",
        default="mkdt",
        metavar="SET",
        help="mkdt (the distilled set, default), mtt_ssl (mkdt analyze mtt), krr_st (mkdt krr_st) or "
        "ext:NAME (mkdt import)",
    )


def main(args: argparse.Namespace) -> None:
    """Run ``mkdt export`` and print where the set went."""
    count = export_set(args.run, args.to, args.set)
    print(f"exported {count} images of {args.set} in {args.run} to {args.to}")


def set_path(store: RunDir, name: str) -> Path:
    """The file of a run's set ``name``; ArtifactError naming the command that makes it when absent."""
    method = parse_method(name) if is_method(name) else None
    source, ext = (method.source, method.external) if method is not None else (None, None)
    if source == "distill":
        path, command = store.synthetic_path, f"mkdt distill --out {store.path}"
    elif source == "mtt":
        path, command = store.mtt_ssl_path, f"mkdt analyze mtt --out {store.path}"
    elif source == "krr_st":
        path, command = store.krr_st_set_path, f"mkdt krr_st --out {store.path}"
    elif ext is not None:
        path, command = store.imported_path(ext), f"mkdt import {ext} SOURCE --out {store.path}"
    else:
        raise ConfigError(f"--set {name!r}: choose mkdt, mtt_ssl, krr_st or ext:NAME")
    if not path.is_file():
        raise ArtifactError(f"no set {name} in {store.path} ({path} is missing); run `{command}` first")
    return path


def to_pixels(images: torch.Tensor, mean: list[float], std: list[float]) -> tuple[torch.Tensor, int]:
    """(uint8 pixels, number of values clipped): round(clamp(x * std + mean, 0, 1) * 255)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    unit = images.float() * s + m
    clipped = int(((unit < 0) | (unit > 1)).sum())
    return (unit.clamp(0, 1) * 255).round().to(torch.uint8), clipped


def export_set(run: str | Path, to: str | Path, name: str = "mkdt") -> int:
    """Write set ``name`` of ``run`` to the new or empty folder ``to`` (module docstring); returns
    the number of images."""
    store, target = RunDir(run), Path(to).expanduser()
    tensors, meta = load_tensors(set_path(store, name))
    if "mean" not in meta or "std" not in meta:
        raise ArtifactError(
            f"{set_path(store, name)} has no mean/std in its metadata; it cannot be mapped to pixels"
        )
    if target.is_dir() and any(target.iterdir()):
        raise ConfigError(f"--to {target} exists and is not an empty folder; choose a new folder")
    check_writable_folder(target, "--to")
    pixels, clipped = to_pixels(tensors["images"], meta["mean"], meta["std"])
    info = {
        "run": str(store.path.resolve()),
        "set": name,
        "lr": float(tensors["lr"]),
        "mean": meta["mean"],
        "std": meta["std"],
        "clipped": clipped,
        "images": len(pixels),
    }
    _write_folder(target, pixels, tensors["targets"], info)
    return len(pixels)


def _write_folder(target: Path, pixels: torch.Tensor, targets: torch.Tensor, info: dict[str, Any]) -> None:
    """The folder's files, written to a hidden sibling folder and renamed to ``target`` at the end
    (after removing the hidden folders of killed exports beside it)."""
    remove_orphaned_siblings(target)
    tmp = temp_sibling(target)
    try:
        (tmp / "images").mkdir(parents=True)
        width = max(6, len(str(len(pixels) - 1)))
        for i, image in enumerate(pixels):
            array = image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            Image.fromarray(array).save(tmp / "images" / f"{i:0{width}d}.png")  # (H, W): L, (H, W, 3): RGB
        save_tensors(tmp / "targets.safetensors", {"targets": targets}, info)
        c, size = pixels.shape[1], pixels.shape[2]
        channels = "grayscale" if c == 1 else "RGB"
        text = README.format(
            count=len(pixels),
            channels=channels,
            size=size,
            dim=targets.shape[1],
            set_name=info["set"],
            to=target,
            **info,
        )
        write_text(tmp / "README.md", text)
        os.replace(tmp, target)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
