"""``mkdt report RUN [RUN ...] --out DIR``: the results of run directories as one page.

Writes ``DIR/report.md`` and ``DIR/index.html`` (the same content as a single self-contained file,
images embedded) and, per run, ``DIR/<name>/*.png`` (``name``: the run folder's name, made unique):

- one results table in the paper's layout (label fractions as row groups, methods as rows, one
  column per task, with several runs one per task and run), "mean ± std" over seeds, the best
  same-size method of each column in bold (``full`` is an upper reference and never bold);
- per run: the caption of its results.md, the headlines of the paired comparisons (each distilled
  set over the random subset and over the best same-size set), accuracy bars with the std as error
  bars, the forest plot of every paired comparison, the cost of each set; the distilled images
  beside their initial images and their difference; the loss, alpha_syn and pixel-change curves of
  distill/history.csv; the class histogram of the init subsets (labels of D_real); the tables and
  plots of RUN/analysis/; the stages' wall and CPU times.

What each run is comes from its stage records, not from its ``config.yaml``
(:mod:`mkdt.reporting.runs`). A part whose inputs are missing is replaced by a note; a path that is
not a run directory, a damaged stage record, ``results.json`` or ``config.yaml``, and an ``--out``
that cannot be written raise ArtifactError before anything is written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mkdt.errors import ArtifactError
from mkdt.files import check_writable_folder, write_error, write_text
from mkdt.reporting.html import page
from mkdt.reporting.runs import RunReport, note
from mkdt.results import results_table
from mkdt.store import RunDir

TITLE = "MKDT report"


def open_run(path: str | Path) -> RunDir:
    """The run directory at ``path``: a folder holding the ``config.yaml`` or ``manifest.json``
    every mkdt command writes; else ArtifactError."""
    store = RunDir(path)
    if not store.is_run():
        what = "a folder without config.yaml or manifest.json" if store.path.is_dir() else "not a folder"
        raise ArtifactError(
            f"{store.path} is not an mkdt run directory ({what}); give the --out of an mkdt run"
        )
    return store


def unique_names(stores: Sequence[RunDir]) -> list[str]:
    """A file-name-safe name per run (its folder's name), with -2, -3, ... on repeats."""
    names: list[str] = []
    for store in stores:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", store.path.resolve().name).strip("-.") or "run"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def combined_table(sections: Sequence[RunReport]) -> list[str]:
    """The markdown lines of the results table of every run with results.json (columns "task
    (run)" when there are several runs), or a note when none has results."""
    records: list[dict[str, Any]] = []
    for section in sections:
        if (found := section.results_records) is not None:
            several = len(sections) > 1
            records += [{**r, "task": f"{r['task']} ({section.name})"} for r in found] if several else found
    if not records:
        return [note("no run has results yet (results.json is written by `mkdt evaluate`)")]
    caption = (
        "Test accuracy (%) of the linear probe (and of fine-tuning, in its own table when run), "
        "mean ± std over seeds; bold: the best same-size method of each column and label fraction "
        "(full data, an upper reference, is never bold)."
    )
    return [caption, "", results_table(records, bold_best=True).rstrip("\n")]


def build_report(runs: Sequence[str | Path], out: str | Path) -> Path:
    """Write the report of the run directories ``runs`` into the folder ``out`` (see the module
    docstring); returns ``out``. Every path is checked to be a run directory with readable records
    and results, and ``out`` to be writable, before anything is written."""
    stores = [open_run(path) for path in runs]
    sections = [RunReport(store, name) for store, name in zip(stores, unique_names(stores), strict=True)]
    folder = Path(out).expanduser()
    check_writable_folder(folder, "--out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder / "report.md", exc) from None
    lines = [f"# {TITLE}", "", f"Runs: {', '.join(f'`{s.path}`' for s in stores)}", "", "## Results", ""]
    lines += [*combined_table(sections), ""]
    for section in sections:
        lines += section.markdown(folder)
    markdown = "\n".join(lines).rstrip("\n") + "\n"
    write_text(folder / "report.md", markdown)
    write_text(folder / "index.html", page(markdown, folder, TITLE))
    return folder
