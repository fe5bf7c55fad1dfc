"""One run directory's section of the report: its figures, written to ``DIR/<name>/``, and its
markdown. Each part reads only what it shows, and a part whose inputs are missing (a stage not run
yet, a run made before ``distill/history.csv`` existed, D_real not found from here) becomes a note
on the page instead of an error."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from mkdt.config import Config, config_from_dict
from mkdt.data import ImageData
from mkdt.data.real import load_real
from mkdt.errors import ArtifactError, ConfigError, MkdtError
from mkdt.files import load_tensors
from mkdt.graph import STAGES
from mkdt.methods import INIT_METHODS
from mkdt.reporting import figures
from mkdt.results import mkdt_margins
from mkdt.store import RunDir

Part = Callable[[], list[str]]


def note(text: str) -> str:
    """A markdown note line (rendered greyed out in the HTML page)."""
    return f"> {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class RunReport:
    """The section of one run directory ``store``, named ``name``; its files go to ``out/name``
    and its markdown refers to them relative to ``out``."""

    def __init__(self, store: RunDir, name: str, out: Path) -> None:
        self.store, self.name = store, name
        self.folder = out / name

    def markdown(self) -> list[str]:
        """The section's markdown lines (headed ``## name``); writes its figures."""
        self.folder.mkdir(parents=True, exist_ok=True)
        lines = [f"## {self.name}", "", f"Run directory: `{self.store.path}`", ""]
        parts: list[tuple[str, Part]] = [
            ("Results", self.results),
            ("Distillation", self.distillation),
            ("Initial subsets", self.init_classes),
            ("Analyses", self.analyses),
            ("Stages", self.stages),
        ]
        for title, part in parts:
            lines += [f"### {title}", ""]
            try:
                lines += part()
            except (MkdtError, OSError, KeyError, ValueError) as exc:  # KeyError: a record of an older mkdt
                why = str(exc) if isinstance(exc, MkdtError) else f"{type(exc).__name__}: {exc}"
                lines.append(note(f"{title.lower()} skipped: {_one_line(why)}"))
            lines.append("")
        return lines

    # ------------------------------------------------------------ inputs

    @functools.cached_property
    def config(self) -> Config:
        """The run's config (``config.yaml``, the last command's), not validated against this
        machine (a CUDA run is reported on a CPU-only machine)."""
        path = self.store.config_path
        try:
            return config_from_dict(yaml.safe_load(path.read_text()))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None

    @functools.cached_property
    def real(self) -> ImageData:
        """D_real of the run's config, on the CPU (a relative ``data.root`` is read from the
        current folder, as the stages did)."""
        return load_real(self.config.data, self.config.seed, torch.device("cpu")).data

    def image(self, name: str, caption: str) -> str:
        """The markdown image line of ``out/<run>/name``."""
        return f"![{caption}]({self.name}/{name})"

    # ------------------------------------------------------------ parts

    def results(self) -> list[str]:
        """The caption of results.md, MKDT's margins and the accuracy bars (the table itself is in
        the report's combined table)."""
        if not self.store.results_path.is_file():
            return [note(f"no results.json yet: run `mkdt evaluate --out {self.store.path}`")]
        records = self.store.load_results()
        lines = []
        md = self.store.results_table_path
        if md.is_file() and not (caption := md.read_text().split("\n\n")[0]).startswith("|"):
            lines += [_one_line(caption), ""]
        if margins := mkdt_margins(records):
            lines += [f"- {line}" for line in margins.splitlines()] + [""]
        figures.accuracy_bars(records, self.folder / "accuracy.png")
        return [*lines, self.image("accuracy.png", "linear-probe accuracy, mean ± std over seeds")]

    def distillation(self) -> list[str]:
        """The record's summary, the distilled images beside their initial images, the curves of
        distill/history.csv and the snapshots."""
        record = self.store.record("distill")
        lines = []
        if record is None:
            lines.append(note("the distill stage has not finished"))
        else:
            r = record["result"]
            speed = f"{r['backend']} backend, {r['seconds_per_iteration']:.2f} s/it"
            loss = f"matching loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}"
            lines += [
                f"{r['iterations']} iterations ({speed}); {loss}; learned alpha_syn {r['learned_lr']:.4g}.",
                "",
            ]
        if self.store.synthetic_path.is_file():
            lines += self._images()
        lines += ["", *self._curves()]
        if snapshots := self.store.snapshot_paths():
            names = ", ".join(f"`{p.relative_to(self.store.path)}`" for p in snapshots)
            lines += ["", f"Snapshots of D_syn: {names}."]
        return lines

    def _images(self) -> list[str]:
        """images.png (initial | distilled | difference); without D_real, the stage's grid.png."""
        tensors, meta = load_tensors(self.store.synthetic_path)
        mean = torch.tensor(meta["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(meta["std"]).view(1, -1, 1, 1)
        distilled = (tensors["images"] * std + mean).clamp(0, 1)
        try:
            subset = self.config.distill.init
            indices = self.store.load_indices(len(distilled))[subset]
            initial = self.real.train_images[indices].float() / 255
        except MkdtError as exc:
            shutil.copyfile(self.store.grid_path, self.folder / "grid.png")
            return [
                note(f"initial images skipped: {_one_line(str(exc))}"),
                "",
                self.image("grid.png", "the distilled images (distill/grid.png)"),
            ]
        shown = figures.shown(len(distilled))
        titles = (
            f"initial ({subset} subset of D_real)",
            f"distilled (after {meta['iterations']} iterations)",
        )
        figures.image_comparison(initial[shown], distilled[shown], self.folder / "images.png", titles)
        caption = f"{len(shown)} of the {len(distilled)} synthetic images, before and after distillation"
        return [self.image("images.png", caption)]

    def _curves(self) -> list[str]:
        if not self.store.history_path.is_file():
            return [note("no distill/history.csv: distillation has not started, or the run predates it")]
        figures.history_curves(self.store.load_history(), self.folder / "curves.png")
        return [self.image("curves.png", "per iteration, from distill/history.csv")]

    def init_classes(self) -> list[str]:
        """The class histogram of the init subsets, with D_real's labels."""
        if not self.store.indices_path.is_file():
            return [note(f"no init subsets yet: run `mkdt init --out {self.store.path}`")]
        subsets = load_tensors(self.store.indices_path)[0]
        labels, classes = self.real.train_labels, self.real.classes
        counts = {
            f"{m} subset" + (" (distilled)" if m == self.config.distill.init else ""): torch.bincount(
                labels[subsets[m]], minlength=len(classes)
            ).tolist()
            for m in INIT_METHODS
            if m in subsets  # runs made before the sas subset existed lack it
        }
        title = (
            f"class counts of the init subsets ({len(subsets[INIT_METHODS[0]])} images each; D_real's labels)"
        )
        figures.class_histogram(counts, classes, self.folder / "classes.png", title)
        return [
            self.image("classes.png", "classes of the initial images (labels of D_real, not used by MKDT)")
        ]

    def analyses(self) -> list[str]:
        """The tables and plots of RUN/analysis/ (`mkdt analyze ...`), plots copied beside the page."""
        folder = self.store.analysis_dir
        files = sorted(p for p in folder.rglob("*") if p.suffix in (".md", ".png")) if folder.is_dir() else []
        if not files:
            return [note(f"no analyses: `mkdt analyze NAME --out {self.store.path}` writes them")]
        lines = []
        for path in files:
            rel = path.relative_to(folder)
            lines += [f"#### analysis/{rel}", ""]
            if path.suffix == ".md":
                lines += [path.read_text().strip(), ""]
            else:
                copy = self.folder / path.relative_to(self.store.path)  # analysis/REL beside the page
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
                lines += [self.image(f"analysis/{rel}", f"analysis/{rel}"), ""]
        return lines

    def stages(self) -> list[str]:
        """When each finished stage ended and how long it took."""
        rows = [(s, self.store.record(s)) for s in STAGES]
        done = [(s, r) for s, r in rows if r is not None]
        if not done:
            raise ArtifactError("no stage has finished yet")
        lines = ["| stage | finished | seconds |", "|---|---|---|"]
        lines += [f"| {s} | {r['finished']} | {r['seconds']:.0f} |" for s, r in done]
        missing = [s for s, r in rows if r is None]
        return lines + (["", note(f"not finished: {', '.join(missing)}")] if missing else [])
