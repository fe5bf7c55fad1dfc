"""``mkdt import NAME SOURCE --out RUN``: a pre-training set from outside the run, evaluated as the
method ``ext:NAME``.

The source (:mod:`mkdt.external.sources`: an index list into D_real, image tensors, an image
folder or another mkdt run) becomes ``RUN/imported/NAME.safetensors`` in the distill stage's set
format: ``images`` normalised like D_real, ``targets`` (n, D) and ``lr``. Targets:

- an index list takes D_real's teacher targets (the targets stage's rows);
- other sources keep the targets they hold when those have the run's D columns; sources without
  targets (or with ``--teacher-targets``) are encoded with the run's teacher, as the targets
  stage encodes D_real (:func:`mkdt.stages.targets.teacher_targets`).

Step size: a set from another mkdt run is pre-trained at its learned alpha_syn (as the ``mkdt``
method is); every other set at ``evaluate.lr`` (as the real subsets are), read when evaluating.
The metadata records the source (path, kind, scale, sha256), where the targets came from, D_real's
``mean``/``std`` and the sha256 of the run's targets file: a set imported before the targets stage
was redone is refused by the evaluation. The set's size and sha256 go to ``RUN/imported/NAME.json``
(:meth:`mkdt.store.RunDir.save_imported`), and a set that no longer matches them is refused before
the evaluation reads it. Importing forgets the finished evaluations of
``ext:NAME`` (its entries in ``evaluate/partial.json``, and the evaluate stage's record when that
evaluated it), so the next ``mkdt evaluate`` pre-trains on the new set alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from mkdt.config import Config
from mkdt.data.real import RealData, load_real
from mkdt.errors import ArtifactError, ConfigError, DataError
from mkdt.external import sources
from mkdt.external.sources import KINDS, SCALES, Found
from mkdt.files import read_json, write_json
from mkdt.graph import defining
from mkdt.methods import external_method, is_method
from mkdt.runtime import Runtime
from mkdt.stages.targets import teacher_targets
from mkdt.store import RunDir, SyntheticSet, now

SUMMARY = "import a pre-training set (index list, image tensors, image folder, mkdt run) as ext:NAME"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``mkdt import``'s own arguments (the config ones are added by the CLI)."""
    parser.add_argument(
        "name", metavar="NAME", help="the set's name: evaluate it as evaluate.methods=[..., ext:NAME]"
    )
    parser.add_argument(
        "source", metavar="SOURCE", help="index list, image tensors, image folder or mkdt run directory"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        help="what SOURCE is (default: from its name; a folder with a run in it is a run)",
    )
    parser.add_argument(
        "--scale",
        choices=SCALES,
        help="pixel scale of image tensors (required for them, checked against the values)",
    )
    parser.add_argument(
        "--teacher-targets",
        action="store_true",
        help="encode the images with the run's teacher even when SOURCE holds targets",
    )
    parser.add_argument("--force", action="store_true", help="replace an imported set of the same NAME")


def main(args: argparse.Namespace, config: Config) -> None:
    """Run ``mkdt import`` and print what was imported."""
    meta = import_set(
        config,
        args.out,
        args.name,
        args.source,
        kind=args.kind,
        scale=args.scale,
        teacher_targets=args.teacher_targets,
        force=args.force,
    )
    lr = "its learned lr" if meta["lr"] == "learned" else "evaluate.lr"
    print(
        f"imported {meta['images']} images from {meta['source']} ({meta['kind']}) into "
        f"{RunDir(args.out).imported_path(args.name)}; targets from {meta['targets']}, pre-trained at "
        f"{lr}; evaluate it with evaluate.methods=[..., {external_method(args.name)}]"
    )


def import_set(
    config: Config,
    out: str | Path,
    name: str,
    source: str | Path,
    *,
    kind: str | None = None,
    scale: str | None = None,
    teacher_targets: bool = False,
    force: bool = False,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Write ``out/imported/<name>.safetensors`` from ``source`` (see the module docstring) and
    return its metadata. Needs the run's finished targets stage (checked against ``config``);
    an existing set of that name is replaced only with ``force``."""
    if not is_method(external_method(name)):
        raise ConfigError(f"NAME {name!r} is not a valid name: use letters, digits, _ . - (e.g. krr_st)")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist")
    kind = kind or sources.infer_kind(path)
    scale = _check_scale_option(kind, scale)
    store = RunDir(out)
    store.require("targets", defining(config, "targets"), f"mkdt targets --out {store.path}")
    if store.imported_path(name).exists() and not force:
        raise ArtifactError(f"{store.imported_path(name)} exists; pass --force to replace it")
    runtime = runtime or Runtime.create(config.device, config.precision, config.channels_last, config.compile)
    real = load_real(config.data, config.seed, runtime.device)
    z = store.load_targets(real.num_train)
    found = _read(kind, path, scale, real, z)
    targets, origin = _targets(config, store, real, found, z.shape[1], teacher_targets)
    files = sources.source_files(path, kind)
    meta = {
        "name": name,
        "source": str(path.resolve()),
        "kind": kind,
        "scale": scale,
        "source_sha256": sources.source_sha256(path, files),
        "targets": origin,
        "lr": "learned" if found.lr is not None else "evaluate.lr",
        "images": len(found.images),
        "mean": list(real.data.mean),
        "std": list(real.data.std),
        "targets_sha256": store.targets_sha256(),
        "imported": now(),
    }
    lr = found.lr if found.lr is not None else config.evaluate.lr
    store.save_imported(name, SyntheticSet(found.images, targets, lr), meta)
    forget_evaluations(store, external_method(name))
    return meta


def _check_scale_option(kind: str, scale: str | None) -> str:
    """The pixel scale of a kind: stated for tensors, implied for the others."""
    implied = {"indices": "uint8", "folder": "uint8", "run": "normalized"}
    if kind == "tensors":
        if scale is None:
            raise ConfigError(f"state the pixel scale of image tensors with --scale ({'|'.join(SCALES)})")
        return scale
    if scale is not None:
        raise ConfigError(f"--scale applies to image tensors only; a {kind} source is {implied[kind]}")
    return implied[kind]


def _read(kind: str, path: Path, scale: str, real: RealData, z: torch.Tensor) -> Found:
    """The source read and checked against D_real (images normalised, on the CPU)."""
    if kind == "indices":
        idx = sources.read_indices(path, real.num_train)
        return Found(real.inputs[idx.to(real.device)].cpu(), z[idx], targets_from="the targets stage")
    if kind == "tensors":
        return sources.tensor_source(path, scale, real.data)
    if kind == "folder":
        if not path.is_dir():
            raise DataError(f"{path} is not a folder; an image folder source is a folder of images")
        return sources.folder_source(path, real.data)
    if not path.is_dir():
        raise DataError(f"{path} is not a folder; a run source is an mkdt run directory")
    return sources.run_source(path, real.data)


def _targets(
    config: Config, store: RunDir, real: RealData, found: Found, dim: int, recompute: bool
) -> tuple[torch.Tensor, str]:
    """(targets, where they came from): the source's when usable and not ``recompute``, else the
    run's teacher's features of the images."""
    if found.targets is None or recompute:
        encoded = teacher_targets(
            config, store, real.data, found.images.to(real.device), desc="import targets"
        )
        return encoded, "the run's teacher"
    shape, n = tuple(found.targets.shape), len(found.images)
    if shape != (n, dim):
        raise DataError(
            f"the source's targets have shape {shape}, not ({n}, {dim}) like the run's teacher "
            "targets; pass --teacher-targets to encode the images with the run's teacher instead"
        )
    if not found.targets.is_floating_point() or not torch.isfinite(found.targets.float()).all():
        raise DataError(f"the source's targets are {found.targets.dtype} with non-finite or non-float values")
    return found.targets.float(), found.targets_from


def forget_evaluations(store: RunDir, method: str) -> None:
    """Drop ``method``'s finished evaluations: its runs in ``evaluate/partial.json`` and the
    evaluate stage's record when that stage evaluated it (the other methods' runs are kept)."""
    record = store.record("evaluate")
    if record is not None and method in record.get("defining", {}).get("evaluate", {}).get("methods", []):
        store.invalidate(["evaluate"])
    if not store.partial_path.is_file():
        return
    partial = read_json(store.partial_path)
    runs = partial.get("runs", {})
    kept = {key: run for key, run in runs.items() if run.get("method") != method}
    if len(kept) != len(runs):
        write_json(store.partial_path, {**partial, "runs": kept})
