"""The one walk of a dataset folder: every real folder entered once, links followed only out of it.

Image-folder decoding (:mod:`mkdt.data.formats.imagefolder`), the cache fingerprint
(:mod:`mkdt.data.cache`), a dataset's identity (:func:`mkdt.data.registry.source_identity`) and
``mkdt import``'s image folders (:mod:`mkdt.external.sources`) all list a folder through
:func:`walk_tree`, so that they agree on what the folder holds.

Links (symbolic links to folders or files) are followed when they lead out of the walked folder:
datasets are often kept on another disk and linked in, or built as trees of links into one store
of images. A link whose target is the walked folder itself, a folder that holds it, or a folder or
file inside it is refused with a one-line :class:`DataError` naming the link: following it would
read the same images again under another path, and so under another class label, or forever (a
link to a folder that holds the link is a cycle). Two links (or a link and a path inside a linked
folder) that lead to the same folder or file are refused the same way, so that no real folder or
file is read twice. Hard links are not links in this sense: they are ordinary names of a file,
counted like copies, as the folder's listing shows them. A link that leads nowhere (dangling, or a
loop of links) is listed as a file, for the caller to skip or report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from mkdt.errors import DataError

Parts = tuple[str, ...]  # a path relative to the walked folder, split into its names
_FIX = "remove the link, or replace it by a copy of what it points to"


class TreeEntry(NamedTuple):
    """A folder or file found by :func:`walk_tree`: its relative ``parts``, its ``path`` (the walked
    folder joined with them, through any links) and whether it is a folder."""

    parts: Parts
    path: Path
    is_dir: bool


def _everything(_parts: Parts, _is_dir: bool) -> bool:
    return True


class _Walk:
    """The state of one walk: the walked folder's real path and every real folder or linked file
    reached so far (by (st_dev, st_ino)), with the path that reached it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = Path(os.path.realpath(root))
        self.reached: dict[tuple[int, int], Path] = {}

    def check_link(self, path: Path) -> None:
        """DataError when the link at ``path`` leads to a folder that holds it (a loop), or into the
        walked folder."""
        target = Path(os.path.realpath(path))
        if Path(os.path.realpath(path.parent)).is_relative_to(target):
            raise DataError(
                f"link {path} points to {target}, a folder that holds the link: following it would "
                f"loop forever; {_FIX}"
            )
        if target.is_relative_to(self.real_root):
            raise DataError(
                f"link {path} points to {target}, inside the dataset folder {self.root}: its images "
                f"would be read twice, under two labels; {_FIX}"
            )

    def reach(self, path: Path, stat: os.stat_result, what: str) -> None:
        """Record a real folder or linked file; DataError when another path reached it before."""
        key = (stat.st_dev, stat.st_ino)
        first = self.reached.setdefault(key, path)
        if first != path:
            raise DataError(
                f"{path} and {first} lead to the same {what} ({os.path.realpath(path)}), which would be "
                f"read twice; {_FIX}"
            )

    def enter(self, parts: Parts, linked: bool) -> bool:
        """Check the folder at ``parts`` before it is listed; whether it was reached through a
        link."""
        path = self.root.joinpath(*parts)
        if parts and path.is_symlink():  # the walked folder itself may be given through a link
            self.check_link(path)
            linked = True
        self.reach(path, _stat(path), "folder")
        return linked

    def file(self, path: Path, is_link: bool, linked: bool) -> None:
        """Check a file that is a link, or lies in a folder reached through one, when it resolves."""
        if not (linked or is_link):
            return
        try:
            stat = path.stat()
        except OSError:  # a dangling link: listed as it is, for the caller to skip or report
            return
        if is_link:
            self.check_link(path)
        self.reach(path, stat, "file")


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as err:
        raise DataError(f"cannot read folder {path} ({err.strerror or err}); check its permissions") from err


def _listing(folder: Path) -> tuple[list[str], list[tuple[str, bool]]]:
    """The folder names in ``folder`` and its other names with whether each is a link, each list
    sorted; a link counts as what it points to, a link that leads nowhere as a file."""
    try:
        with os.scandir(folder) as entries:
            named = [(entry.name, entry.is_dir(), entry.is_symlink()) for entry in entries]
    except OSError as err:
        raise DataError(
            f"cannot list folder {folder} ({err.strerror or err}); check its permissions"
        ) from err
    folders = sorted(name for name, is_dir, _ in named if is_dir)
    files = sorted((name, is_link) for name, is_dir, is_link in named if not is_dir)
    return folders, files


def walk_tree(root: Path, keep: Callable[[Parts, bool], bool] = _everything) -> Iterator[TreeEntry]:
    """The folders and files under ``root`` (not ``root`` itself), depth first: in each folder its
    files in sorted order, then each subfolder (sorted) followed by its contents; so the files come
    in the order of ``os.walk`` with sorted names. ``keep(parts, is_dir)`` says which entries to
    list: a folder it rejects is not entered. Links follow the rules of the module docstring
    (DataError naming the link otherwise); an unreadable folder raises DataError."""
    walk = _Walk(root)
    walk.enter((), linked=False)
    stack: list[tuple[Parts, bool]] = [((), False)]
    while stack:
        parts, linked = stack.pop()
        if parts:
            linked = walk.enter(parts, linked)
            yield TreeEntry(parts, root.joinpath(*parts), True)
        folders, files = _listing(root.joinpath(*parts))
        for name, is_link in files:
            if keep((*parts, name), False):
                walk.file(root.joinpath(*parts, name), is_link, linked)
                yield TreeEntry((*parts, name), root.joinpath(*parts, name), False)
        stack.extend(((*parts, name), linked) for name in reversed(folders) if keep((*parts, name), True))
