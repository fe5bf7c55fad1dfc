"""The run directory: artifacts written atomically, loaded without executing code.

Layout of a run directory ``OUT``::

    OUT/config.yaml                 resolved config of the last command
    OUT/manifest.json               config, seed, versions, and one record per finished stage
    OUT/<stage>/stage.json          the stage's record: fingerprint, defining config, time, result
    OUT/teacher/encoder.safetensors
    OUT/teacher/checkpoint.pt       resumable training state (torch.load(weights_only=True))
    OUT/targets/targets.safetensors
    OUT/experts/expert_0000.safetensors ...

Each stage has a *fingerprint*: a hash of the config keys that define its result (and those of the
stages it reads). A stage refuses to reuse or extend an artifact whose fingerprint differs.
Stage records live in their own files so that ranks of a distributed run can share one folder.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mkdt.errors import ArtifactError

METADATA_KEY = "mkdt"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}; delete it to redo that stage") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors file with ``metadata`` stored as JSON under the key ``mkdt``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_tensors`; a missing or corrupt file raises ArtifactError."""
    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"corrupt artifact {path} ({exc}); delete it to redo that stage") from None


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``mkdt`` metadata of a :func:`save_tensors` file, read from its header alone."""
    if not path.is_file():
        raise ArtifactError(f"missing artifact {path}")
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > path.stat().st_size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        return json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "{}"))
    except (OSError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"corrupt artifact {path} ({exc}); delete it to redo that stage") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A plain-dict checkpoint (tensors, numbers, strings) written atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ArtifactError(f"corrupt checkpoint {path} ({type(exc).__name__}); delete it") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in a process: stage
    definitions ask for the teacher checkpoint's hash once per expert file they check."""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(defining: dict[str, Any]) -> str:
    """Short hash of a JSON-able dict (sorted keys)."""
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one random stream, e.g. ``derive_seed(seed, "expert", 3)``."""
    text = "/".join(str(n) for n in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def versions() -> dict[str, str]:
    from mkdt import __version__

    return {"mkdt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for the first few keys whose values differ."""
    a, b = _flatten(old), _flatten(new)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


class RunDir:
    """A run directory: stage records, compatibility checks, the manifest."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def record(self, stage: str) -> dict[str, Any] | None:
        """The finished stage's record, or None if the stage has not finished."""
        path = self.stage_dir(stage) / "stage.json"
        return read_json(path) if path.is_file() else None

    def is_done(self, stage: str, defining: dict[str, Any]) -> bool:
        """True if the stage finished with this config; ArtifactError if with another one."""
        record = self.record(stage)
        if record is None:
            return False
        self.check_compatible(stage, record, defining)
        return True

    def check_compatible(self, stage: str, found: dict[str, Any], defining: dict[str, Any]) -> None:
        """Raise ArtifactError when an artifact's recorded config differs from ``defining``."""
        if found.get("fingerprint") != fingerprint(defining):
            raise ArtifactError(
                f"the {stage} in {self.stage_dir(stage)} was made with a different config "
                f"({describe_difference(found.get('defining', {}), defining)}); use another --out, "
                f"or --force to redo {stage} and the stages after it")

    def finished_or_reset(self, stage: str, defining: dict[str, Any], force: bool,
                          scratch: tuple[Path, ...] = ()) -> dict[str, Any] | None:
        """The record of a stage finished with this config (skip it), or None (run it).

        With ``force`` the record and the ``scratch`` files (checkpoints, partial results) are
        removed first; a record made with another config raises ArtifactError.
        """
        if force:
            self.invalidate([stage])
            for path in scratch:
                path.unlink(missing_ok=True)
            return None
        return self.record(stage) if self.is_done(stage, defining) else None

    def require(self, stage: str, defining: dict[str, Any], command: str) -> dict[str, Any]:
        """The record of a prerequisite stage, checked for compatibility."""
        record = self.record(stage)
        if record is None:
            raise ArtifactError(f"no finished {stage} in {self.path}; run `{command}` first")
        self.check_compatible(stage, record, defining)
        return record

    def finish(self, stage: str, defining: dict[str, Any], seconds: float,
               result: dict[str, Any]) -> dict[str, Any]:
        """Write the stage record (last, so a crash never leaves a stage that looks finished)."""
        record = {"fingerprint": fingerprint(defining), "defining": defining, "seconds": seconds,
                  "finished": now(), "versions": versions(), "result": result}
        write_json(self.stage_dir(stage) / "stage.json", record)
        return record

    def write_manifest(self, config: dict[str, Any], stages: list[str]) -> None:
        """manifest.json: the config, seed, versions, creation time and every stage's record."""
        path = self.path / "manifest.json"
        created = read_json(path).get("created", now()) if path.is_file() else now()
        records = {s: r for s in stages if (r := self.record(s)) is not None}
        write_json(path, {"created": created, "updated": now(), "seed": config.get("seed"),
                          "versions": versions(), "config": config, "stages": records})

    def invalidate(self, stages: list[str]) -> None:
        """Forget finished stages (their records), e.g. for --force; artifacts are overwritten later."""
        for stage in stages:
            (self.stage_dir(stage) / "stage.json").unlink(missing_ok=True)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

