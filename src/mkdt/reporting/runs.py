"""One run directory's section of the report: its figures, written to ``DIR/<name>/``, and its
markdown.

What the run is comes from the records of its finished stages (``OUT/<stage>/stage.json``, each
holding the definition its artifacts were made with), never from ``config.yaml``, which a later
command or a hand edit may have changed: the init subset a distilled set started from is the one
in the distill stage's record, D_real (its dataset, resolution, pool and seed) the one in the
record of the stage whose artifact is drawn. Only where D_real's files lie (``data.root``,
``data.cache_dir``, which do not change the images) is read from ``config.yaml``.

The inputs are read and checked when a section is made (:class:`RunReport`), before anything is
written: a damaged stage record, ``results.json`` or ``config.yaml`` raises ArtifactError naming the
file and how to redo it. Each part then reads only what it shows, and a part whose inputs are
missing (a stage not run yet, a run made before ``distill/history.csv`` existed, D_real not found
from here) becomes a note on the page instead of an error."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from mkdt.config import DataConfig
from mkdt.data import ImageData
from mkdt.data.real import load_real
from mkdt.data.registry import source_identity
from mkdt.errors import ArtifactError, MkdtError
from mkdt.files import load_tensors, write_error
from mkdt.graph import STAGES
from mkdt.methods import INIT_METHODS
from mkdt.reporting import figures
from mkdt.results import costs_table, headline_lines, headlines, paired_comparisons, set_costs, setting_title
from mkdt.store import RunDir

Part = Callable[[], list[str]]
Record = dict[str, Any]
LOCATION_KEYS = ("name", "root", "cache_dir")  # of config.yaml's data section: where D_real's files lie


def note(text: str) -> str:
    """A markdown note line (rendered greyed out in the HTML page)."""
    return f"> {text}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _read_text(path: Path) -> str:
    """A text file of the run, as UTF-8 whatever the locale (bytes that are not UTF-8 replaced)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _cpu_seconds(record: Record) -> str:
    """A stage record's CPU seconds, "–" when it has none (written before they were kept)."""
    value = record.get("cpu_seconds")
    return f"{value:.0f}" if _number(value) else "–"


def read_records(store: RunDir) -> dict[str, Record]:
    """The records of the run's finished stages; ArtifactError, with the command that redoes the
    stage, for a record that cannot be read or lacks what a stage record holds (its definition,
    result, time and end)."""
    records = {}
    for stage in STAGES:
        record = store.record(stage)
        if record is None:
            continue
        if not (
            isinstance(record, dict)
            and isinstance(record.get("defining"), dict)
            and isinstance(record.get("result"), dict)
            and _number(record.get("seconds"))
            and isinstance(record.get("finished"), str)
        ):
            raise ArtifactError(
                f"the {stage} stage's record in {store.path} is not a stage record (stage.json lacks its "
                f"definition, result or time); redo the stage with `mkdt {stage} --force --out {store.path}`"
            )
        records[stage] = record
    return records


def _is_result(record: Any) -> bool:
    """Whether ``record`` has what the report reads of a result record (:mod:`mkdt.results`)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("method"), str)
        and isinstance(record.get("task"), str)
        and isinstance(record.get("protocol", "probe"), str)
        and _number(record.get("label_fraction"))
        and (record.get("mean") is None or (_number(record["mean"]) and _number(record.get("std"))))
        and isinstance(record.get("diverged_seeds", []), list)
    )


def read_results(store: RunDir) -> list[Record] | None:
    """The records of ``results.json``, None without one; ArtifactError, with the command that
    redoes it, when it cannot be read or is not a list of result records."""
    if not store.results_path.is_file():
        return None
    records = store.load_results()
    if not all(map(_is_result, records)):
        raise ArtifactError(
            f"{store.results_path} does not hold result records; redo it with "
            f"`mkdt evaluate --repair --out {store.path}` (--force if that finds nothing to repair)"
        )
    return records


def data_location(store: RunDir) -> dict[str, Any]:
    """``data.name``, ``data.root`` and ``data.cache_dir`` of the run's ``config.yaml`` ({} without
    one): where the last command found D_real's files; ArtifactError when it cannot be read."""
    path = store.config_path
    if not path.is_file():
        return {}
    fix = "restore it, or delete it to look for D_real at the default places"
    try:
        config = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:  # ValueError: not UTF-8
        raise ArtifactError(f"cannot read {path} ({_one_line(str(exc))}); {fix}") from None
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), (str, type(None))) for k in LOCATION_KEYS
    ):
        raise ArtifactError(f"{path} is not an mkdt config (no data section naming the data's files); {fix}")
    return {key: data.get(key) for key in LOCATION_KEYS}


class RunReport:
    """The section of one run directory ``store``, named ``name``. Making it reads and checks the
    run's inputs (stage records, results, where D_real lies); :meth:`markdown` writes its files to
    ``out/name`` and refers to them relative to ``out``."""

    def __init__(self, store: RunDir, name: str) -> None:
        self.store, self.name = store, name
        self.records = read_records(store)
        self.results_records = read_results(store)
        self.location = data_location(store)
        self._real: dict[str, ImageData] = {}
        self.folder = Path()

    def markdown(self, out: Path) -> list[str]:
        """The section's markdown lines (headed ``## name``); writes its figures to ``out/name``."""
        self.folder = out / self.name
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(self.folder / "accuracy.png", exc) from None
        lines = [f"## {self.name}", "", f"Run directory: `{self.store.path}`", ""]
        parts: list[tuple[str, Part]] = [
            ("Results", self.results),
            ("Cost of each set", self.costs),
            ("Distillation", self.distillation),
            ("Initial subsets", self.init_classes),
            ("Analyses", self.analyses),
            ("Stages", self.stages),
        ]
        for title, part in parts:
            lines += [f"### {title}", ""]
            try:
                lines += part()
            except (MkdtError, OSError, KeyError, TypeError, ValueError) as exc:  # an older or edited record
                why = str(exc) if isinstance(exc, MkdtError) else f"{type(exc).__name__}: {exc}"
                lines.append(note(f"{title.lower()} skipped: {_one_line(why)}"))
            lines.append("")
        return lines

    # ------------------------------------------------------------ inputs

    def real(self, stage: str) -> ImageData:
        """D_real as the finished stage ``stage`` read it (dataset, resolution, pool and seed of its
        record), on the CPU; its files are looked for where config.yaml says (a relative path from
        the current folder, as the stages did) when it names the same dataset, else at the default
        places. ArtifactError when the images of a dataset given by a path changed since."""
        definition = self.records[stage]["defining"]
        data, seed = definition["data"], definition["seed"]
        key = json.dumps([data, seed], sort_keys=True)
        if key not in self._real:
            self._real[key] = load_real(self._data_config(data), seed, torch.device("cpu")).data
        return self._real[key]

    def _data_config(self, data: dict[str, Any]) -> DataConfig:
        """The data section that finds the images a record's ``data`` definition names."""
        source = data.get("source")
        here = self.location
        root = source["path"] if source else (here.get("root") if here.get("name") == data["name"] else None)
        config = DataConfig(
            name="imagefolder" if source else data["name"],
            root=root,
            cache_dir=here.get("cache_dir"),
            resolution=data.get("resolution"),
            pool_size=data.get("pool_size"),
        )
        if source and source_identity(config.name, config.root) != source:
            raise ArtifactError(f"the images in {root} changed since the run (their names or sizes)")
        return config

    def distilled_from(self) -> str:
        """The init subset the finished distill stage started from (its record), checked to be the
        subset of the finished init stage's artifacts; ArtifactError otherwise."""
        distill, init = self.records.get("distill"), self.records.get("init")
        if distill is None:
            raise ArtifactError("the distill stage has not finished: its record names the init subset")
        if init is None or any(distill["defining"].get(k) != v for k, v in init["defining"].items()):
            raise ArtifactError(
                "the init stage was redone after distilling: its subsets are not the ones used"
            )
        self.store.verified("init")
        subset: str = distill["defining"]["distill"]["init"]
        return subset

    def image(self, name: str, caption: str) -> str:
        """The markdown image line of ``out/<run>/name``."""
        return f"![{caption}]({self.name}/{name})"

    # ------------------------------------------------------------ parts

    def results(self) -> list[str]:
        """The caption of results.md, the headlines (each distilled set over the random subset and
        over the best same-size set, paired over seeds), the accuracy bars and the forest plot of
        every paired comparison (the table itself is in the report's combined table)."""
        records = self.results_records
        if records is None:
            return [note(f"no results.json yet: run `mkdt evaluate --out {self.store.path}`")]
        lines = []
        md = self.store.results_table_path
        if md.is_file() and not (caption := _read_text(md).split("\n\n")[0]).startswith("|"):
            lines += [_one_line(caption), ""]
        for h in headlines(records):
            title = setting_title((h["protocol"], h["task"], h["label_fraction"]))
            lines += [f"- {title}: {line}" for line in headline_lines(h)]
        figures.accuracy_bars(records, self.folder / "accuracy.png")
        lines += ["", self.image("accuracy.png", "linear-probe accuracy, mean ± std over seeds")]
        if not (comparisons := paired_comparisons(records)):
            return [
                *lines,
                "",
                note("no paired comparisons: no distilled set shares a seed with another set"),
            ]
        figures.forest_plot(comparisons, self.folder / "forest.png")
        caption = "each distilled set minus each other set, paired by seed: mean and 95% t-interval"
        return [*lines, "", self.image("forest.png", caption)]

    def costs(self) -> list[str]:
        """What producing each evaluated set cost: the stages that make it, from their records
        (:func:`mkdt.results.set_costs`), and the evaluation's own seconds per pre-training."""
        if self.results_records is None:
            return [note("no results.json yet: the evaluated sets are not known")]
        methods = [r["method"] for r in self.results_records]
        evaluate = self.records.get("evaluate")
        pretraining = evaluate["result"].get("seconds_per_pretraining") if evaluate else None
        return costs_table(set_costs(methods, self.records), pretraining).rstrip("\n").splitlines()

    def distillation(self) -> list[str]:
        """The record's summary, the distilled images beside their initial images, the curves of
        distill/history.csv and the snapshots."""
        record = self.records.get("distill")
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
            subset = self.distilled_from()
            indices = self.store.load_indices(len(distilled), [subset])[subset]
            initial = self.real("distill").train_images[indices].float() / 255
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
        """The class histogram of the finished init stage's subsets, with the labels of its D_real;
        the subset the distilled set started from is marked."""
        if "init" not in self.records:
            return [note(f"no init subsets yet: run `mkdt init --out {self.store.path}`")]
        self.store.verified("init")
        subsets = load_tensors(self.store.indices_path)[0]
        real = self.real("init")
        labels, classes = real.train_labels, real.classes
        try:
            distilled = self.distilled_from()
        except MkdtError:
            distilled = None
        counts = {
            f"{m} subset" + (" (distilled)" if m == distilled else ""): torch.bincount(
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
                lines += [_read_text(path).strip(), ""]
            else:
                copy = self.folder / path.relative_to(self.store.path)  # analysis/REL beside the page
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
                lines += [self.image(f"analysis/{rel}", f"analysis/{rel}"), ""]
        return lines

    def stages(self) -> list[str]:
        """When each finished stage ended and how long it took (wall clock and CPU time; "–" for CPU
        time in records written before it was kept); the unfinished ones, optional stages (krr_st)
        left out."""
        rows = [(s, self.records.get(s)) for s in STAGES]
        done = [(s, r) for s, r in rows if r is not None]
        if not done:
            raise ArtifactError("no stage has finished yet")
        lines = ["| stage | finished | seconds | CPU seconds |", "|---|---|---|---|"]
        lines += [f"| {s} | {r['finished']} | {r['seconds']:.0f} | {_cpu_seconds(r)} |" for s, r in done]
        missing = [s for s, r in rows if r is None and not STAGES[s].optional]
        return lines + (["", note(f"not finished: {', '.join(missing)}")] if missing else [])
