"""Files written atomically and read without executing code: the storage layer under the run
directory (:mod:`mkdt.store`) and the dataset cache (:mod:`mkdt.data.cache`).

- tensors: safetensors files whose JSON metadata sits under the header key ``mkdt``;
  :func:`read_metadata` reads it from the header alone (no tensor is loaded);
- checkpoints: plain dicts of tensors, numbers and strings saved with ``torch.save`` and loaded
  with ``weights_only=True``;
- text and JSON.

A run directory's lock (:func:`lock_file`) is an ``flock`` on a file in it, which the kernel
releases however its holder ends.

Every write goes to a temporary file in a private folder beside the target
(``.<name>.<host>.<pid>.<random>.tmp/``) and
replaces it with one ``os.replace``, so a kill leaves either the old file or the new one, and at
worst a temporary folder that :func:`remove_orphaned_temp_files` recognises by its dead process. Files
get the permissions the user's umask gives new files. A failed write (full disk, read-only folder,
a file where a folder should be) and a missing or unreadable file raise :class:`ArtifactError`
naming the file and the cause.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mkdt.errors import ArtifactError

METADATA_KEY = "mkdt"
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\..+\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")
# test hook: seconds to wait between writing a temporary file and renaming it into place, so that
# the kill-and-resume tests can kill a process inside an artifact write
_DELAY_ENV = "MKDT_TEST_WRITE_DELAY"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def write_error(path: Path, exc: BaseException) -> ArtifactError:
    """A one-line ArtifactError for a failed write of ``path``, naming the cause: a full disk, a
    folder that is not writable, or a file where a folder should be."""
    code = getattr(exc, "errno", None)
    free = free_bytes(path.parent)
    text = getattr(exc, "strerror", None) or " ".join(str(exc).split()) or type(exc).__name__
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ArtifactError(f"cannot write in {path.parent} ({text}); choose a writable --out")
    if code in (errno.ENOTDIR, errno.EEXIST):
        return ArtifactError(
            f"cannot create {path.parent} ({text}): a file is in the way of a folder; choose another --out"
        )
    if code == errno.ENOSPC or (code is None and free is not None and free < 1 << 20):
        return ArtifactError(
            f"cannot write {path}: the disk is full ({(free or 0) / 2**20:.1f} MB free "
            f"in {path.parent}); free some space or choose another --out"
        )
    return ArtifactError(f"cannot write {path} ({text})")


def check_writable_folder(path: Path, option: str) -> None:
    """ArtifactError (one line naming ``option``, e.g. ``--out``) unless ``path`` is a folder this
    process can write in or can make: a file at ``path`` or in the way of it, and a nearest existing
    folder that cannot be written (permissions, a read-only file system) are refused. Writes
    nothing."""
    try:
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"{option} {path} is a file, not a folder; choose another {option}")
        nearest = next(p for p in (path, *path.parents) if p.exists())
    except OSError as exc:
        raise ArtifactError(f"cannot reach {path} ({exc.strerror}); choose another {option}") from None
    if not nearest.is_dir():
        raise ArtifactError(
            f"cannot create {path}: {nearest} is a file, not a folder; choose another {option}"
        )
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ArtifactError(
            f"cannot write in {nearest} (no permission, or a read-only file system); "
            f"choose a writable {option}"
        )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path for ``path``; on success it replaces ``path`` in one rename.

    The temporary path lies in a private folder beside ``path`` (``.<name>.<host>.<pid>.<random>.tmp``),
    so that temporary files of the writer itself (safetensors writes through one) are removed
    with it. An OSError while writing (e.g. a full disk) becomes an ArtifactError naming the
    cause; the private folder is removed either way."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(
            tempfile.mkdtemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        )
    except OSError as exc:
        raise write_error(path, exc) from None
    tmp = folder / path.name
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        if delay := float(os.environ.get(_DELAY_ENV, "0") or 0):
            time.sleep(delay)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _orphaned(path: Path) -> bool:
    """Whether ``path`` is named like a temporary file or folder of an mkdt process of this host
    (``.<name>.<host>.<pid>.<random>.tmp``) whose process no longer exists."""
    match = _TEMP.match(path.name)
    if match is None or match["host"] != _HOST:
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's process, or no process id
        pass
    return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_orphaned_temp_files(folder: Path) -> int:
    """Remove the temporary files under ``folder`` left by killed mkdt processes of this host
    (their process no longer exists); returns how many were removed."""
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.rglob(".*.tmp"):
        if _orphaned(path):
            _remove(path)
            removed += 1
    return removed


def temp_sibling(path: Path) -> Path:
    """A new name beside ``path`` for a temporary file or folder that becomes ``path`` when
    complete (``.<name>.<host>.<pid>.<random>.tmp``): if the process is killed before, the next
    :func:`remove_orphaned_siblings` of ``path`` (or :func:`remove_orphaned_temp_files` of its
    folder) removes it."""
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def remove_orphaned_siblings(path: Path) -> int:
    """Remove the temporary files and folders beside ``path`` (in its folder, not below) left by
    killed mkdt processes of this host; returns how many were removed."""
    removed = 0
    if not path.parent.is_dir():
        return 0
    for sibling in path.parent.glob(".*.tmp"):
        if _orphaned(sibling):
            _remove(sibling)
            removed += 1
    return removed


def write_text(path: Path, text: str) -> None:
    """``text`` written atomically to ``path``, as UTF-8 whatever the locale; what UTF-8 cannot
    encode (the lone surrogates that stand for the bytes of a path that is not UTF-8) is written
    as a backslash escape."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON with sorted keys, written atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    """The JSON in ``path`` (UTF-8, whatever the locale); a file that cannot be read or is not JSON
    (binary bytes, nesting too deep to parse) raises ArtifactError."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8
        raise ArtifactError(f"cannot read {path}: {' '.join(str(exc).split())}") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors file with ``metadata`` stored as JSON under the key ``mkdt``."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        except SafetensorError as exc:  # raised for I/O errors too, e.g. a full disk
            raise write_error(path, exc) from None


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_tensors`; a missing or corrupt file raises ArtifactError."""
    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"corrupt artifact {path} ({exc})") from None


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``mkdt`` metadata of a :func:`save_tensors` file, read from its header alone."""
    header = _read_header(path)
    try:
        metadata: dict[str, Any] = json.loads(header.get("__metadata__", {}).get(METADATA_KEY, "{}"))
        return metadata
    except (ValueError, AttributeError) as exc:
        raise ArtifactError(f"corrupt artifact {path} ({exc})") from None


def read_tensor_names(path: Path) -> set[str]:
    """The names of the tensors in a :func:`save_tensors` file, read from its header alone."""
    return set(_read_header(path)) - {"__metadata__"}


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; ArtifactError when it is missing or unreadable."""
    if not path.is_file():
        raise ArtifactError(f"missing artifact {path}")
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > path.stat().st_size:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a mapping")
        return header
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"corrupt artifact {path} ({exc})") from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """A plain-dict checkpoint (tensors, numbers, strings) written atomically."""
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as exc:  # torch reports a failed write as "unexpected pos ..."
            raise write_error(path, exc) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A :func:`save_checkpoint` file, loaded with ``weights_only=True`` (no code runs)."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
        return state
    except Exception as exc:  # torch raises many types for a bad file
        raise ArtifactError(f"corrupt checkpoint {path} ({type(exc).__name__})") from None


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime) in a process: a run
    directory's artifacts are hashed when their stage records them and checked against that hash
    before every stage that reads them, and stage definitions ask for the teacher checkpoint's
    hash once per expert file they check. (A change that keeps a file's size and modification
    time is seen by the next process.)"""
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LocksUnsupported(ArtifactError):
    """The file system of a lock file does not support ``flock`` (some network file systems)."""


def lock_file(path: Path, note: str) -> int | None:
    """An open descriptor of ``path`` (created when missing) that holds an exclusive ``flock`` on
    the file ``path`` names, with ``note`` (who holds it) written into the file; None, without
    waiting, when another process holds it (:func:`lock_note` reads its note). The kernel
    releases the lock when the descriptor is closed or its process ends, however it ends (SIGKILL,
    a reboot). Release it with :func:`unlock_file`, which removes the file first: a process that
    opened the removed file in between finds that ``path`` names another file and starts over.
    A file system without ``flock`` raises :class:`LocksUnsupported`; another OSError (a
    read-only folder, a file where a folder should be) raises ArtifactError."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:  # e.g. ENOSYS, ENOLCK: a file system without flock
            if os.fstat(fd).st_size == 0:
                path.unlink(missing_ok=True)  # made by this call
            os.close(fd)
            raise LocksUnsupported(f"cannot lock {path} ({exc.strerror})") from None
        if _names(path, fd):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, note.encode())
            except OSError as exc:
                os.close(fd)
                raise write_error(path, exc) from None
            return fd
        os.close(fd)  # the holder removed the file before we locked it: lock the one named now


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` names the open file ``fd``."""
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def lock_note(path: Path) -> str:
    """The note the holder of a :func:`lock_file` lock wrote ("" when it has not yet, or is gone)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def unlock_file(path: Path, fd: int) -> None:
    """Release a :func:`lock_file` lock: the file removed, then the descriptor closed."""
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def fingerprint(defining: dict[str, Any]) -> str:
    """Short hash of a JSON-able dict (sorted keys): the identity of what a definition produces."""
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key: old -> new`` for the first few keys whose values differ."""
    a, b = flatten(old), flatten(new)
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")


def check_same_definition(what: str, where: Path, found: dict[str, Any], defining: dict[str, Any]) -> None:
    """Raise ArtifactError when ``found`` (a record or checkpoint holding ``fingerprint`` and
    ``defining``) was made with another definition than ``defining``, naming the keys that differ."""
    if found.get("fingerprint") != fingerprint(defining):
        raise ArtifactError(
            f"the {what} in {where} was made with a different config "
            f"({describe_difference(found.get('defining', {}), defining)}); use another --out, "
            f"or --force to redo {what} and the stages after it"
        )


class Tee(io.TextIOBase):
    """A text stream that writes to ``stream`` and appends the same text to ``log``, where a
    line's carriage-return redraws (terminal progress bars) are reduced to their final state."""

    def __init__(self, stream: TextIO, log: TextIO) -> None:
        self.stream, self.log, self._line = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            self.log.write(line.rsplit("\r", 1)[-1] + "\n")
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@contextmanager
def logged_to(path: Path) -> Iterator[None]:
    """Inside the block, what is printed to stdout and stderr is also appended to ``path``, as UTF-8
    whatever the locale; what UTF-8 cannot encode (the lone surrogates that stand for the bytes of
    a path that is not UTF-8) is written as a backslash escape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", errors="backslashreplace") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)
        try:
            yield
        finally:
            for tee in (sys.stdout, sys.stderr):
                if isinstance(tee, Tee) and tee._line:
                    log.write(tee._line.rsplit("\r", 1)[-1] + "\n")
            sys.stdout, sys.stderr = out, err
