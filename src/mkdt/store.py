"""The run directory: stage records, and every artifact's typed reader and writer.

Stages talk to each other only through this store. Layout of a run directory ``OUT``::

    OUT/config.yaml                          resolved config of the last command
    OUT/manifest.json                        config, seed, code version, every finished stage's record
    OUT/log.txt                              what the commands printed, appended command by command
    OUT/<stage>/stage.json                   the stage's record: fingerprint, definition, wall and CPU
                                             seconds, result, each artifact's size and sha256
    OUT/teacher/encoder.safetensors          teacher encoder state dict (+ model, normalisation)
    OUT/teacher/checkpoint.pt                resumable SSL training state
    OUT/targets/targets.safetensors          ``targets`` (N, D) float32, rows in D_real order
    OUT/experts/expert_KKKK.safetensors      ``params`` (S, P), ``epochs`` (S,), ``loss`` (epochs,)
    OUT/init/indices.safetensors             ``high_loss``, ``random``, ``sas`` (n,), ``loss`` (N,)
    OUT/distill/synthetic.safetensors        ``images``, ``targets``, ``lr`` (the distilled set)
    OUT/distill/grid.png, checkpoint.pt      the distilled images; resumable matching state
    OUT/distill/history.csv                  per iteration: loss, alpha_syn, pixel change, segments
    OUT/distill/snapshot_<it>.safetensors    the set after iteration <it> (``distill.snapshots``)
    OUT/distill/variants/<init>/             synthetic.safetensors, grid.png, checkpoint.pt,
                                             history.csv, snapshot_<it>.safetensors of the variant
                                             that starts from init subset <init> (``distill.variants``)
    OUT/krr_st/synthetic.safetensors         ``images``, ``targets``, ``lr`` (the KRR-ST set; the
                                             distilled set's format)
    OUT/krr_st/checkpoint.pt                 resumable KRR-ST state (set, optimizer, student pool)
    OUT/evaluate/partial.json                finished (method, seed) evaluations
    OUT/results.json                         the evaluation's records, paired comparisons, headlines
                                             (and the sets' costs when given): {"records", ...}
    OUT/results.md                           its tables, paired differences and costs
    OUT/imported/<name>.safetensors          a set of ``mkdt import``, evaluated as ``ext:<name>``
    OUT/imported/<name>.json                 its size and sha256, checked before it is read
    OUT/analysis/<name>.md, .json, .png      ``mkdt analyze <name>``'s table, numbers and plot:
                                             trajectories, window (the window check of ``mkdt run``),
                                             replay (md and json), variance, mtt
    OUT/analysis/mtt/<m>_expert_KKKK.safetensors  expert k of ``mkdt analyze mtt``'s method <m>
                                             (mtt_ssl, mtt_sl)
    OUT/analysis/mtt/mtt_ssl.safetensors     the MTT-SSL set of ``mkdt analyze mtt``, evaluated as
                                             ``mtt_ssl``
    OUT/.lock                                while a command writes: its lock, with who holds it

Every file but the appended ``log.txt`` is written in a private temporary folder beside it
(``.<name>.<host>.<pid>.<random>.tmp``) and renamed into place (:func:`mkdt.files.atomic_path`);
:meth:`RunDir.prepare` removes the folders that killed processes left.

A stage is finished when its ``stage.json`` exists; that record is written last, so a crash never
leaves a stage that looks finished. Each stage's *definition* (:mod:`mkdt.graph`) is stored in its
record and in every artifact it makes, and a stage refuses to reuse or extend one made with another
definition. The record holds each artifact's size and sha256, and a stage's artifacts are checked
against both before another stage reads them (:meth:`RunDir.verified`). Records live in one file
per stage so that ranks of a distributed run can share a folder. One process at a time writes into
a run directory (:meth:`RunDir.locked`).
"""

from __future__ import annotations

import csv
import datetime
import functools
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mkdt.errors import ArtifactError
from mkdt.files import (
    LocksUnsupported,
    atomic_path,
    check_same_definition,
    file_sha256,
    fingerprint,
    free_bytes,
    load_tensors,
    lock_file,
    lock_note,
    read_json,
    read_metadata,
    remove_orphaned_temp_files,
    save_tensors,
    unlock_file,
    write_error,
    write_json,
    write_text,
)
from mkdt.methods import INIT_METHODS
from mkdt.results import headlines, paired_comparisons
from mkdt.train.kd import Trajectory
from mkdt.train.matching import History

HISTORY_COLUMNS = ("iteration", "loss", "alpha_syn", "pixel_change", "experts", "start_epochs")


@dataclass
class SyntheticSet:
    """A pre-training set: normalised images, their regression targets and the step size to train
    on them with (the distilled set, or a real subset with the evaluation's lr)."""

    images: torch.Tensor  # (n, C, H, W) float32, normalised like D_real
    targets: torch.Tensor  # (n, D) float32
    lr: float

    def digest(self) -> str:
        """sha256 of the images, the targets (their shapes, dtypes and bytes) and the step size:
        two sets with one digest pre-train the same students."""
        h = hashlib.sha256(repr(self.lr).encode())
        for t in (self.images, self.targets):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{tuple(t.shape)} {t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
        return h.hexdigest()


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, Any]:
    """The code that made a record: mkdt's version, and when mkdt runs from a git checkout its
    commit and whether the checkout had uncommitted changes; torch and Python versions; torch's
    intra-op thread count (results on CPU are the same bits only for the same thread count)."""
    from mkdt import __version__

    return {
        "mkdt": __version__,
        **_git_state(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),  # CPU results depend on it
    }


@functools.lru_cache(maxsize=1)
def _git_state() -> dict[str, Any]:
    """{"git_commit", "git_dirty"} of the checkout holding this package, {} when it is not in one."""
    here = Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        if not (Path(top) / "src" / "mkdt").resolve() == here:
            return {}
        commit = subprocess.run(
            ["git", "-C", top, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", top, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": bool(status.strip())}


class RunDir:
    """A run directory: stage records, compatibility checks, the manifest, typed artifacts.

    ``variant_init`` (see :meth:`variant`) moves the distilled set's files, and only those, to the
    folder of that distill variant."""

    def __init__(self, path: str | Path, variant_init: str | None = None) -> None:
        self.path = Path(path).expanduser()
        self.variant_init = variant_init

    # ------------------------------------------------------------ stage records

    def stage_dir(self, stage: str) -> Path:
        """The folder of a stage's artifacts and record."""
        return self.path / stage

    def record(self, stage: str) -> dict[str, Any] | None:
        """The finished stage's record, or None if the stage has not finished."""
        path = self.stage_dir(stage) / "stage.json"
        if not path.is_file():
            return None
        try:
            record: dict[str, Any] = read_json(path)
        except ArtifactError as exc:
            raise ArtifactError(
                f"{exc}; the {stage} stage's record is damaged: redo the stage with "
                f"`mkdt {stage} --force --out {self.path}`"
            ) from None
        return record

    def is_done(self, stage: str, defining: dict[str, Any]) -> bool:
        """True if the stage finished with this definition; ArtifactError if with another one."""
        record = self.record(stage)
        if record is None:
            return False
        check_same_definition(stage, self.stage_dir(stage), record, defining)
        return True

    def finished_or_reset(
        self, stage: str, defining: dict[str, Any], force: bool, scratch: tuple[Path, ...] = ()
    ) -> dict[str, Any] | None:
        """The record of a stage finished with this definition (skip it), or None (run it).

        With ``force`` the record and the ``scratch`` files (checkpoints, partial results) are
        removed first; a record made with another definition raises ArtifactError.
        """
        if force:
            self.invalidate([stage])
            for path in scratch:
                path.unlink(missing_ok=True)
            return None
        if not self.is_done(stage, defining):
            return None
        return self.verified(stage)

    def require(self, stage: str, defining: dict[str, Any], command: str) -> dict[str, Any]:
        """The record of a prerequisite stage, checked against its definition, its artifacts
        checked against the sizes and sha256 it recorded (:meth:`verified`); ArtifactError naming
        ``command`` when it has not finished."""
        record = self.record(stage)
        if record is None:
            raise ArtifactError(f"no finished {stage} in {self.path}; run `{command}` first")
        check_same_definition(stage, self.stage_dir(stage), record, defining)
        return self.verified(stage)

    def damaged(self, stage: str) -> list[str]:
        """The artifacts (paths relative to the run directory) of a finished stage that are missing
        or are not the files the stage recorded: another size, or another sha256 (hashed once per
        file version in a process, :func:`mkdt.files.file_sha256`)."""
        record = self.record(stage) or {}
        return [rel for rel, meta in record.get("artifacts", {}).items() if self._problem(rel, meta)]

    def _problem(self, rel: str, meta: dict[str, Any]) -> str | None:
        """What is wrong with the recorded artifact ``rel`` (its record entry ``meta``), or None."""
        path = self.artifact_path(rel)
        if not path.is_file():
            return "missing"
        if path.stat().st_size != meta["size"]:
            return f"damaged ({path.stat().st_size} bytes; the stage wrote {meta['size']})"
        if meta.get("sha256") not in (None, file_sha256(path)):
            return "damaged (its sha256 is not the one the stage recorded)"
        return None

    def verified(self, stage: str) -> dict[str, Any]:
        """The stage's record, after checking that its artifacts are all there with their recorded
        sizes and sha256; a missing or damaged one raises ArtifactError naming the file and the
        command that repairs it."""
        record = self.record(stage)
        assert record is not None
        bad = self.damaged(stage)
        if bad:
            problem = self._problem(bad[0], record["artifacts"][bad[0]])
            more = f" (and {len(bad) - 1} more of its files)" if len(bad) > 1 else ""
            raise ArtifactError(
                f"{self.artifact_path(bad[0])}{more} of the finished {stage} stage is {problem}; "
                f"repair it with `mkdt {stage} --repair --out {self.path}` (redoes only what is "
                "missing or damaged)"
            )
        return record

    def finish(
        self,
        stage: str,
        defining: dict[str, Any],
        seconds: float,
        result: dict[str, Any],
        artifacts: tuple[Path, ...] = (),
        *,
        cpu_seconds: float | None = None,
    ) -> dict[str, Any]:
        """Write the stage record (last, so a crash never leaves a stage that looks finished), with
        the size and sha256 of every file in ``artifacts``. ``seconds`` is the stage's wall-clock
        time, ``cpu_seconds`` (recorded when given) the CPU time of this process over it: timings
        that stay out of the fingerprint and that readers treat as unknown in older records."""
        record = {
            "fingerprint": fingerprint(defining),
            "defining": defining,
            "seconds": seconds,
            **({} if cpu_seconds is None else {"cpu_seconds": cpu_seconds}),
            "finished": now(),
            "versions": versions(),
            "result": result,
            "artifacts": {
                str(path.relative_to(self.path)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
                for path in artifacts
            },
        }
        write_json(self.stage_dir(stage) / "stage.json", record)
        return record

    def prepare(self) -> bool:
        """Make sure the run directory exists and is writable, and remove the temporary files that
        killed mkdt processes left in it; ArtifactError (one line) if it cannot be written.
        Returns whether the folder was created."""
        probe = self.path / ".mkdt-write-test"
        created = not self.path.exists()
        try:
            if not created and not self.path.is_dir():
                raise ArtifactError(f"--out {self.path} is a file, not a folder; choose another --out")
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise write_error(probe, exc) from None
        remove_orphaned_temp_files(self.path)
        return created

    @property
    def lock_path(self) -> Path:
        """``.lock``: held (``flock``) by the command writing into the run directory, with who it is."""
        return self.path / ".lock"

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run directory's lock for the block: one process writes into a run directory
        at a time. The folder is made if missing (and removed again if the block leaves it empty);
        ``.lock`` gets this process's host, pid, ``command`` and start time, and is removed when
        the block ends. ArtifactError (one line) naming the holder when another process holds it,
        or when the folder cannot be made. A lock left by a killed process or a reboot is free
        (the kernel released it) and taken over. Assumes a file system that honours ``flock``
        across the processes that may share the folder (local disks do; network file systems may
        not, and one that refuses ``flock`` gets a warning and no lock)."""
        made = self._make_folder()
        try:
            with self._lock(command):
                yield
        finally:
            for folder in reversed(made):  # deepest first; stops at one the block filled
                try:
                    folder.rmdir()
                except OSError:
                    break

    @contextmanager
    def _lock(self, command: str) -> Iterator[None]:
        """:meth:`locked` in an existing folder; on a file system without ``flock`` a warning
        that nothing keeps other processes out, and no lock."""
        holder = {"host": platform.node(), "pid": os.getpid(), "command": command, "started": now()}
        unsupported = None
        try:
            fd = lock_file(self.lock_path, json.dumps(holder))
        except LocksUnsupported as exc:
            fd, unsupported = None, exc
        if unsupported is not None:
            print(
                f"mkdt: warning: {unsupported}: this file system has no locks, so nothing keeps "
                f"another mkdt command from writing into {self.path} meanwhile",
                file=sys.stderr,
            )
            yield
            return
        if fd is None:
            raise ArtifactError(self._in_use())
        try:
            yield
        finally:
            unlock_file(self.lock_path, fd)

    def _make_folder(self) -> list[Path]:
        """Make the run directory and its missing parents; returns those made, outermost first.
        ArtifactError when ``--out`` is a file or cannot be made."""
        if self.path.exists() and not self.path.is_dir():
            raise ArtifactError(f"--out {self.path} is a file, not a folder; choose another --out")
        made = []
        for folder in reversed([p for p in (self.path, *self.path.parents) if not p.exists()]):
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise write_error(folder / ".mkdt-write-test", exc) from None
            made.append(folder)
        return made

    def _in_use(self) -> str:
        """The refusal when another process holds the lock, naming it from the lock's note."""
        try:
            holder = json.loads(lock_note(self.lock_path))
            who = (
                f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                f"{' '.join(str(holder['command']).split())}"
            )
        except (ValueError, TypeError, KeyError):
            who = "it has not written which yet"
        return (
            f"{self.path} is in use by another mkdt process ({who}); wait for it to finish or stop "
            "it, then run this command again"
        )

    def free_bytes(self) -> int | None:
        """Free space on the run directory's file system (of its nearest existing parent before
        it is created); None when it cannot be read."""
        return free_bytes(self.path)

    @property
    def config_path(self) -> Path:
        """``config.yaml``: the resolved config of the last command."""
        return self.path / "config.yaml"

    @property
    def analysis_dir(self) -> Path:
        """``analysis/``: the tables, numbers and plots of ``mkdt analyze``."""
        return self.path / "analysis"

    @property
    def manifest_path(self) -> Path:
        """``manifest.json``: the config, seed, code version and every finished stage's record."""
        return self.path / "manifest.json"

    def is_run(self) -> bool:
        """Whether the folder is a run directory: every command writes config.yaml or manifest.json."""
        return self.config_path.is_file() or self.manifest_path.is_file()

    def write_manifest(self, config: dict[str, Any], stages: list[str]) -> None:
        """manifest.json: the config, seed, code version, creation time and every stage's record."""
        path = self.manifest_path
        created = read_json(path).get("created", now()) if path.is_file() else now()
        records = {s: r for s in stages if (r := self.record(s)) is not None}
        write_json(
            path,
            {
                "created": created,
                "updated": now(),
                "seed": config.get("seed"),
                "versions": versions(),
                "config": config,
                "stages": records,
            },
        )

    def invalidate(self, stages: list[str]) -> None:
        """Forget finished stages (their records), e.g. for --force; artifacts are overwritten later."""
        for stage in stages:
            (self.stage_dir(stage) / "stage.json").unlink(missing_ok=True)

    # ------------------------------------------------------------ the log, analyses, recorded artifacts

    @property
    def log_path(self) -> Path:
        """``log.txt``: what the stage commands and ``mkdt run`` printed, appended command by command."""
        return self.path / "log.txt"

    def analysis_path(self, name: str, suffix: str) -> Path:
        """``analysis/<name>.<suffix>``: analysis ``name``'s table (md), numbers (json) or plot (png)."""
        return self.analysis_dir / f"{name}.{suffix}"

    def artifact_path(self, rel: str) -> Path:
        """The artifact that a stage record names by ``rel``, its path relative to the run directory."""
        return self.path / rel

    # ------------------------------------------------------------ teacher

    @property
    def encoder_path(self) -> Path:
        """``teacher/encoder.safetensors``."""
        return self.stage_dir("teacher") / "encoder.safetensors"

    @property
    def teacher_checkpoint_path(self) -> Path:
        """``teacher/checkpoint.pt``: the resumable SSL training state."""
        return self.stage_dir("teacher") / "checkpoint.pt"

    def save_encoder(self, encoder: torch.nn.Module, metadata: dict[str, Any]) -> None:
        """The teacher encoder's state dict, with its model and normalisation in ``metadata``."""
        save_tensors(self.encoder_path, encoder.state_dict(), metadata)

    # ------------------------------------------------------------ targets

    @property
    def targets_path(self) -> Path:
        """``targets/targets.safetensors``."""
        return self.stage_dir("targets") / "targets.safetensors"

    def save_targets(self, targets: torch.Tensor) -> None:
        """The (N, D) teacher targets, rows in D_real order."""
        save_tensors(
            self.targets_path, {"targets": targets}, {"num_images": len(targets), "dim": targets.shape[1]}
        )

    def load_targets(self, num_images: int) -> torch.Tensor:
        """The (N, D) targets, checked against the size of D_real."""
        targets = load_tensors(self.targets_path)[0]["targets"]
        if len(targets) != num_images:
            raise ArtifactError(
                f"{self.targets_path} has {len(targets)} rows but D_real has "
                f"{num_images} images; redo the stage with --force"
            )
        return targets

    # ------------------------------------------------------------ experts

    def expert_path(self, k: int) -> Path:
        """``experts/expert_KKKK.safetensors`` of expert k."""
        return self.stage_dir("experts") / f"expert_{k:04d}.safetensors"

    def expert_paths(self) -> list[Path]:
        """Every expert file in ``experts/``, whatever the number of experts it was made for."""
        return sorted(self.stage_dir("experts").glob("expert_*.safetensors"))

    def save_expert(self, k: int, trajectory: Trajectory, fp: str, metadata: dict[str, Any]) -> None:
        """Expert k's trajectory, tagged with the experts' fingerprint ``fp``."""
        save_tensors(
            self.expert_path(k),
            {"params": trajectory.params, "epochs": torch.tensor(trajectory.epochs), "loss": trajectory.loss},
            {"fingerprint": fp, "index": k, **metadata},
        )

    def has_expert(self, k: int, fp: str) -> bool:
        """Whether expert k exists with fingerprint ``fp`` (read from the header alone; files are
        written atomically, so an existing file is complete)."""
        path = self.expert_path(k)
        if not path.is_file():
            return False
        try:
            return read_metadata(path).get("fingerprint") == fp
        except ArtifactError:
            return False

    def expert_metadata(self, k: int) -> dict[str, Any]:
        """Expert k's metadata (fingerprint, index, arch, final loss), from the file's header."""
        return read_metadata(self.expert_path(k))

    def load_expert(self, k: int, fp: str, epochs: list[int] | None = None) -> Trajectory:
        """Expert k, checked against the fingerprint ``fp`` and, when given, holding ``epochs``."""
        path = self.expert_path(k)
        tensors, meta = load_tensors(path)
        if meta.get("fingerprint") != fp:
            raise ArtifactError(
                f"{path} was made with a different config; use another --out or redo experts with --force"
            )
        trajectory = Trajectory(tensors["params"], tuple(tensors["epochs"].tolist()), tensors["loss"])
        missing = sorted(set(epochs or ()) - set(trajectory.epochs))
        if missing:
            raise ArtifactError(
                f"{path} stores epochs {list(trajectory.epochs)} but epochs {missing} "
                "are needed; redo experts with --force (experts.save_epochs must "
                "include them)"
            )
        return trajectory

    # ------------------------------------------------------------ init

    @property
    def indices_path(self) -> Path:
        """``init/indices.safetensors``."""
        return self.stage_dir("init") / "indices.safetensors"

    def save_indices(self, subsets: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        """The init subsets (``INIT_METHODS`` -> (n,) indices into D_real) and the (N,) per-image loss."""
        n = len(next(iter(subsets.values())))
        save_tensors(self.indices_path, {**subsets, "loss": loss}, {"images": n})

    def load_indices(self, images: int, subsets: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """{"high_loss", "random", "sas": (n,), "loss": (N,)}, checked to hold ``images`` indices
        and each of ``subsets`` (an init made before the SAS subset existed lacks ``sas``)."""
        tensors = load_tensors(self.indices_path)[0]
        if len(tensors["high_loss"]) != images:
            raise ArtifactError(f"{self.indices_path} does not hold {images} indices; redo init with --force")
        if missing := sorted(set(subsets) - set(tensors)):
            raise ArtifactError(
                f"{self.indices_path} was made before the {', '.join(missing)} subset existed; "
                f"`mkdt init --out {self.path}` adds it (the other subsets and later stages stay valid)"
            )
        return tensors

    # ------------------------------------------------------------ distill

    def variant(self, init: str) -> RunDir:
        """The run directory as distill variant ``init`` (``distill.variants``) sees it: its set,
        grid, checkpoint, history and snapshots (the paths, readers and writers below) are those
        in ``distill/variants/<init>/``; every other path is the run's."""
        return RunDir(self.path, init)

    def variants_on_disk(self) -> list[str]:
        """The init subsets that have a folder in ``distill/variants/`` (finished or not)."""
        folder = self.stage_dir("distill") / "variants"
        return sorted(p.name for p in folder.glob("*") if p.is_dir() and p.name in INIT_METHODS)

    @property
    def distill_dir(self) -> Path:
        """``distill/``, or ``distill/variants/<init>/`` for a :meth:`variant`."""
        folder = self.stage_dir("distill")
        return folder if self.variant_init is None else folder / "variants" / self.variant_init

    @property
    def synthetic_path(self) -> Path:
        """``distill/synthetic.safetensors``: the distilled set."""
        return self.distill_dir / "synthetic.safetensors"

    @property
    def distill_checkpoint_path(self) -> Path:
        """``distill/checkpoint.pt``: the resumable matching state."""
        return self.distill_dir / "checkpoint.pt"

    def snapshot_path(self, iteration: int) -> Path:
        """``distill/snapshot_<iteration>.safetensors``: the set after that iteration."""
        return self.distill_dir / f"snapshot_{iteration}.safetensors"

    def snapshot_paths(self) -> list[Path]:
        """Every snapshot file in ``distill/``."""
        return sorted(self.distill_dir.glob("snapshot_*.safetensors"))

    def save_synthetic(
        self,
        synthetic: SyntheticSet,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        iterations: int,
        path: Path | None = None,
    ) -> None:
        """The distilled set after ``iterations`` at ``path`` (default :attr:`synthetic_path`; a
        snapshot at :meth:`snapshot_path`); ``mean``/``std`` map its images back to pixels
        (x * std + mean)."""
        if synthetic.lr <= 0 or not math.isfinite(synthetic.lr) or not torch.isfinite(synthetic.images).all():
            raise ArtifactError(
                f"distillation ended with alpha_syn = {synthetic.lr:.4g} or non-finite "
                "images; lower distill.lr_img or distill.lr_lr and rerun with --force"
            )
        save_tensors(
            path or self.synthetic_path,
            {"images": synthetic.images, "targets": synthetic.targets, "lr": torch.tensor(synthetic.lr)},
            {"mean": list(mean), "std": list(std), "iterations": iterations},
        )

    def load_synthetic(self, path: Path | None = None) -> SyntheticSet:
        """The distilled set (images normalised like D_real, targets, alpha_syn), or the snapshot
        at ``path``."""
        tensors = load_tensors(path or self.synthetic_path)[0]
        return SyntheticSet(tensors["images"], tensors["targets"], float(tensors["lr"]))

    def require_variant(self, init: str) -> Path:
        """The set file of distill variant ``init``; ArtifactError naming ``distill.variants`` and
        the command that makes it when the finished distill stage's record does not list it."""
        path = self.variant(init).synthetic_path
        if str(path.relative_to(self.path)) not in (self.record("distill") or {}).get("artifacts", {}):
            raise ArtifactError(
                f"the distill stage in {self.path} has no variant {init}; list it in distill.variants "
                f"and run `mkdt distill --out {self.path}` (the main set is kept)"
            )
        return path

    def load_variant(self, init: str) -> SyntheticSet:
        """The set of distill variant ``init`` (:meth:`require_variant`)."""
        return self.load_synthetic(self.require_variant(init))

    @property
    def history_path(self) -> Path:
        """``distill/history.csv``: one row per iteration (:data:`HISTORY_COLUMNS`)."""
        return self.distill_dir / "history.csv"

    def write_history(self, history: History, since: int = 0) -> None:
        """``distill/history.csv``: with ``since=0`` the header and every entry of ``history``,
        written atomically (dropping rows a killed run wrote after its last checkpoint); else the
        entries from ``since`` on appended. Floats are written exactly (``repr``); a row's B
        experts and start epochs are space-separated."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if since == 0:
            writer.writerow(HISTORY_COLUMNS)
        for i in range(since, len(history)):
            writer.writerow(
                [
                    i + 1,
                    repr(history.loss[i]),
                    repr(history.lr[i]),
                    repr(history.pixel_change[i]),
                    " ".join(map(str, history.experts[i])),
                    " ".join(map(str, history.start_epochs[i])),
                ]
            )
        if since == 0:
            write_text(self.history_path, buffer.getvalue())
            return
        try:
            with open(self.history_path, "a") as fh:
                fh.write(buffer.getvalue())
        except OSError as exc:
            raise write_error(self.history_path, exc) from None

    def load_history(self) -> History:
        """The history that ``distill/history.csv`` holds; ArtifactError if it is unreadable."""
        history = History()
        try:
            with open(self.history_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            history.extend(
                [
                    [float(row["loss"]), float(row["alpha_syn"]), float(row["pixel_change"])]
                    + [float(k) for k in row["experts"].split()]
                    + [float(s) for s in row["start_epochs"].split()]
                    for row in rows
                ]
            )
        except (OSError, KeyError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"cannot read {self.history_path} ({exc})") from None
        return history

    # ------------------------------------------------------------ krr_st

    @property
    def krr_st_set_path(self) -> Path:
        """``krr_st/synthetic.safetensors``: the KRR-ST set, in the distilled set's format."""
        return self.stage_dir("krr_st") / "synthetic.safetensors"

    @property
    def krr_st_checkpoint_path(self) -> Path:
        """``krr_st/checkpoint.pt``: the resumable KRR-ST state."""
        return self.stage_dir("krr_st") / "checkpoint.pt"

    def save_krr_st(
        self, synthetic: SyntheticSet, mean: tuple[float, ...], std: tuple[float, ...], iterations: int
    ) -> None:
        """The KRR-ST set after ``iterations`` (``images`` normalised like D_real, ``targets``,
        ``lr``: the step size its pool students trained at); ``mean``/``std`` map its images back
        to pixels (x * std + mean). ArtifactError when its images or targets are not finite."""
        if not (torch.isfinite(synthetic.images).all() and torch.isfinite(synthetic.targets).all()):
            raise ArtifactError(
                "KRR-ST ended with non-finite images or targets; lower krr_st.outer_lr and rerun "
                f"`mkdt krr_st --force --out {self.path}`"
            )
        save_tensors(
            self.krr_st_set_path,
            {"images": synthetic.images, "targets": synthetic.targets, "lr": torch.tensor(synthetic.lr)},
            {"mean": list(mean), "std": list(std), "iterations": iterations},
        )

    def load_krr_st(self, lr: float) -> SyntheticSet:
        """The KRR-ST set, to be pre-trained at ``lr`` (KRR-ST learns no step size)."""
        tensors = load_tensors(self.krr_st_set_path)[0]
        return SyntheticSet(tensors["images"], tensors["targets"], lr)

    # ------------------------------------------------------------ mkdt analyze mtt

    @property
    def mtt_dir(self) -> Path:
        """``analysis/mtt/``: the expert trajectories and the MTT-SSL set of ``mkdt analyze mtt``."""
        return self.analysis_dir / "mtt"

    def mtt_expert_path(self, method: str, k: int) -> Path:
        """``analysis/mtt/<method>_expert_KKKK.safetensors``: expert k of MTT method ``method``."""
        return self.mtt_dir / f"{method}_expert_{k:04d}.safetensors"

    def save_mtt_expert(
        self, method: str, k: int, trajectory: Trajectory, definition: dict[str, Any]
    ) -> None:
        """Expert k of ``method``, tagged with its ``definition`` and the fingerprint of the
        definition with ``index`` k."""
        save_tensors(
            self.mtt_expert_path(method, k),
            {"params": trajectory.params, "epochs": torch.tensor(trajectory.epochs), "loss": trajectory.loss},
            {"fingerprint": fingerprint(definition | {"index": k}), "defining": definition, "index": k},
        )

    def load_mtt_expert(self, method: str, k: int, definition: dict[str, Any]) -> Trajectory | None:
        """Expert k of ``method`` when its file was made with ``definition``; None when it is
        missing, unreadable or was made with another definition."""
        path, fp = self.mtt_expert_path(method, k), fingerprint(definition | {"index": k})
        try:
            if not path.is_file() or read_metadata(path).get("fingerprint") != fp:
                return None
        except ArtifactError:
            return None
        tensors = load_tensors(path)[0]
        return Trajectory(tensors["params"], tuple(tensors["epochs"].tolist()), tensors["loss"])

    @property
    def mtt_ssl_path(self) -> Path:
        """``analysis/mtt/mtt_ssl.safetensors``: the MTT-SSL set of ``mkdt analyze mtt`` (the
        distill stage's format), evaluated as the ``mtt_ssl`` method."""
        return self.mtt_dir / "mtt_ssl.safetensors"

    def save_mtt_ssl(
        self,
        synthetic: SyntheticSet,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        metadata: dict[str, Any],
    ) -> None:
        """The MTT-SSL set in the distill stage's format (``images``, ``targets``, ``lr``; metadata
        ``mean``, ``std`` mapping the images back to pixels, x * std + mean) plus ``metadata`` (its
        ``iterations`` among them); ArtifactError when its images or lr are not finite."""
        if synthetic.lr <= 0 or not math.isfinite(synthetic.lr) or not torch.isfinite(synthetic.images).all():
            raise ArtifactError(
                "the MTT-SSL set has non-finite images; lower --lr-img and rerun `mkdt analyze mtt`"
            )
        save_tensors(
            self.mtt_ssl_path,
            {"images": synthetic.images, "targets": synthetic.targets, "lr": torch.tensor(synthetic.lr)},
            {"mean": list(mean), "std": list(std), **metadata},
        )

    def require_mtt_ssl(self) -> Path:
        """The MTT-SSL set's file; ArtifactError naming the command that makes it when absent."""
        if not self.mtt_ssl_path.is_file():
            raise ArtifactError(
                f"no MTT-SSL set in {self.path} ({self.mtt_ssl_path} is missing); run "
                f"`mkdt analyze mtt --out {self.path}` first"
            )
        return self.mtt_ssl_path

    def load_mtt_ssl(self) -> SyntheticSet:
        """The MTT-SSL set (images normalised like D_real, teacher targets, its KD lr); ArtifactError
        naming the command that makes it when absent (:meth:`require_mtt_ssl`)."""
        tensors = load_tensors(self.require_mtt_ssl())[0]
        return SyntheticSet(tensors["images"], tensors["targets"], float(tensors["lr"]))

    # ------------------------------------------------------------ imported sets (mkdt import)

    def imported_path(self, name: str) -> Path:
        """``imported/<name>.safetensors``: a set of ``mkdt import`` in the distill stage's format
        (its source in the metadata), evaluated as the ``ext:<name>`` method."""
        return self.path / "imported" / f"{name}.safetensors"

    def targets_sha256(self) -> str | None:
        """The sha256 that the targets stage recorded for its artifact; None before it finished."""
        artifacts = (self.record("targets") or {}).get("artifacts", {})
        sha: str | None = artifacts.get(str(self.targets_path.relative_to(self.path)), {}).get("sha256")
        return sha

    def imported_record_path(self, name: str) -> Path:
        """``imported/<name>.json``: the size and sha256 of imported set ``name`` as ``mkdt import``
        wrote it, checked before the set is read (:meth:`require_imported`)."""
        return self.path / "imported" / f"{name}.json"

    def save_imported(self, name: str, synthetic: SyntheticSet, metadata: dict[str, Any]) -> None:
        """Imported set ``name``; ``metadata`` holds ``mean``/``std``, its source, ``lr`` ("learned":
        pre-train at the stored lr, else at ``evaluate.lr``) and the run's ``targets_sha256``. Its
        size and sha256 are then written to :meth:`imported_record_path`."""
        path = self.imported_path(name)
        save_tensors(
            path,
            {"images": synthetic.images, "targets": synthetic.targets, "lr": torch.tensor(synthetic.lr)},
            metadata,
        )
        record = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        write_json(self.imported_record_path(name), record)

    def require_imported(self, name: str, *, same_targets: bool = True) -> dict[str, Any]:
        """The metadata of imported set ``name`` (read from the file's header alone); ArtifactError
        naming the ``mkdt import`` command when it is absent, is not the file ``mkdt import``
        wrote (another size or sha256 than :meth:`imported_record_path` holds; a set imported
        before the record existed has none to check) or, with ``same_targets``, was imported
        against other teacher targets than the finished targets stage's."""
        path = self.imported_path(name)
        if not path.is_file():
            raise ArtifactError(
                f"no imported set {name} in {self.path} ({path} is missing); run "
                f"`mkdt import {name} SOURCE --out {self.path}` first"
            )
        meta = read_metadata(path)
        if (problem := self._imported_problem(name)) is not None:
            raise ArtifactError(
                f"{path} is {problem}; import it again with `mkdt import {name} "
                f"{meta.get('source', 'SOURCE')} --out {self.path} --force`"
            )
        if same_targets and meta.get("targets_sha256") != self.targets_sha256():
            raise ArtifactError(
                f"{path} was imported against other teacher targets (the targets stage was redone "
                f"since); import it again with `mkdt import {name} {meta.get('source', 'SOURCE')} "
                f"--out {self.path} --force`"
            )
        return meta

    def _imported_problem(self, name: str) -> str | None:
        """How imported set ``name`` differs from the file ``mkdt import`` recorded, or None (also
        for a set imported before the record existed)."""
        record_path = self.imported_record_path(name)
        if not record_path.is_file():
            return None
        return self._problem(str(self.imported_path(name).relative_to(self.path)), read_json(record_path))

    def load_imported(self, name: str, lr: float) -> SyntheticSet:
        """Imported set ``name`` at its learned lr, or else at ``lr``; ArtifactError naming the
        ``mkdt import`` command when it is absent or was imported against other teacher targets
        (:meth:`require_imported`)."""
        meta = self.require_imported(name)
        tensors = load_tensors(self.imported_path(name))[0]
        step = float(tensors["lr"]) if meta.get("lr") == "learned" else lr
        return SyntheticSet(tensors["images"], tensors["targets"], step)

    @property
    def grid_path(self) -> Path:
        """``distill/grid.png``: the distilled images as pixels."""
        return self.distill_dir / "grid.png"

    def save_grid(
        self, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], max_images: int = 400
    ) -> None:
        """``distill/grid.png``: (up to ``max_images``) normalised images mapped back to pixels."""
        from torchvision.utils import save_image

        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        pixels = (images[:max_images].detach().cpu() * s + m).clamp(0, 1)
        nrow = max(1, int(math.sqrt(len(pixels))))
        with atomic_path(self.grid_path) as tmp:
            save_image(pixels, tmp, nrow=nrow, padding=1, format="png")

    # ------------------------------------------------------------ evaluate

    @property
    def partial_path(self) -> Path:
        """``evaluate/partial.json``: finished (method, seed) evaluations."""
        return self.stage_dir("evaluate") / "partial.json"

    def load_partial(self, fp: str) -> dict[str, Any]:
        """Finished (method, seed) runs ``{"method/seed": run}`` of partial.json made with
        fingerprint ``fp``; {} if it is absent or made with another definition."""
        if not self.partial_path.is_file():
            return {}
        partial = read_json(self.partial_path)
        runs: dict[str, Any] = partial.get("runs", {}) if partial.get("fingerprint") == fp else {}
        return runs

    def save_partial(self, fp: str, runs: dict[str, Any]) -> None:
        """partial.json with the finished ``runs`` of an evaluation with fingerprint ``fp``."""
        write_json(self.partial_path, {"fingerprint": fp, "runs": runs})

    @property
    def results_path(self) -> Path:
        """``results.json``: the evaluation's records (:mod:`mkdt.results`)."""
        return self.path / "results.json"

    @property
    def results_table_path(self) -> Path:
        """``results.md``: the evaluation's table, its caption, MKDT's margins, the paired differences
        and the cost of each set."""
        return self.path / "results.md"

    def save_results(
        self, records: list[dict[str, Any]], table: str, costs: dict[str, Any] | None = None
    ) -> None:
        """``results.json``, the object ``{"records", "comparisons", "headlines"}`` (the records of
        :mod:`mkdt.results`, their :func:`~mkdt.results.paired_comparisons` and
        :func:`~mkdt.results.headlines`) with ``"costs"`` when given
        (:func:`~mkdt.results.set_costs`), and ``results.md`` (``table``: the text to show)."""
        content: dict[str, Any] = {
            "records": records,
            "comparisons": paired_comparisons(records),
            "headlines": headlines(records),
        }
        if costs is not None:
            content["costs"] = costs
        write_json(self.results_path, content)
        write_text(self.results_table_path, table)

    def load_results(self) -> list[dict[str, Any]]:
        """The evaluation's records, from results.json as :meth:`save_results` writes it or as older
        versions did (the bare list of records); ArtifactError when it is missing, unreadable or
        neither."""
        if not self.results_path.is_file():
            raise ArtifactError(f"missing artifact {self.results_path}")
        content = read_json(self.results_path)
        records = content.get("records") if isinstance(content, dict) else content
        if not isinstance(records, list):
            raise ArtifactError(
                f"{self.results_path} does not hold result records; redo it with "
                f"`mkdt evaluate --repair --out {self.path}` (--force if that finds nothing to repair)"
            )
        return records
