"""``mkdt report``: the page of a real tiny run (digits), of several runs, of unfinished runs, and
its refusal of a folder that is not a run or of damaged inputs; what a run is read from its stage
records; the page loaded in headless Chromium when one is installed (``apt-get install chromium``)."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from mkdt.cli import main
from mkdt.errors import ArtifactError
from mkdt.graph import STAGES
from mkdt.pipeline import run_stages
from mkdt.reporting import build_report
from mkdt.store import RunDir
from tests.helpers import tiny_config

SETTINGS = [
    "teacher.probe=false",
    "distill.check_window=false",
    "distill.iterations=6",
    "distill.snapshots=[2]",
]
FIGURES = ("accuracy.png", "forest.png", "images.png", "curves.png", "classes.png", "analysis/variance.png")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run with an analysis table and plot in RUN/analysis/."""
    root = tmp_path_factory.mktemp("report")
    out = root / "tiny"
    run_stages(tiny_config(root / "cache", *SETTINGS), out, list(STAGES))
    (out / "analysis").mkdir()
    shutil.copyfile(out / "distill" / "grid.png", out / "analysis" / "variance.png")
    (out / "analysis" / "variance.md").write_text("Variance.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    return out


@pytest.fixture(scope="module")
def report(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "report"
    assert main(["report", str(run), "--out", str(out)]) == 0
    return out


class Page(HTMLParser):
    """The tags and image sources of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def _parsed(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_markdown_has_the_table_with_the_best_in_bold(run, report):
    text = (report / "report.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| (10|50)% \|", line)]
    assert len(rows) == len(RunDir(run).load_results())  # one per record
    for fraction in ("10%", "50%"):
        bold = [r for r in rows if r.startswith(f"| {fraction} |") and "**" in r]
        assert len(bold) >= 1 and not any("full data" in r for r in bold)
    assert "| labels | method | digits |" in text


def test_the_run_section_names_the_headlines_and_the_cost_of_each_set(report):
    text = (report / "report.md").read_text()
    for fraction in ("10%", "50%"):
        assert f"- Linear probe, digits, {fraction} labels: MKDT over the random subset: " in text
        assert f"- Linear probe, digits, {fraction} labels: MKDT over the best same-size set (" in text
    assert ", n = 2" in text  # evaluate.seeds=2: paired over both seeds
    assert "### Cost of each set" in text
    assert "| method | stages | wall s | CPU s | evaluation's pre-training s | note |" in text
    mkdt = next(line for line in text.splitlines() if line.startswith("| MKDT | teacher, targets"))
    assert "–" not in mkdt.split(" | ")[2:4]  # the stages of this run recorded their CPU time
    assert "| stage | finished | seconds | CPU seconds |" in text


def test_every_image_of_the_page_and_the_markdown_exists(report):
    page = _parsed(report / "index.html")
    assert page.tags.count("table") == 4  # results, the cost of each set, the analysis table, the stages
    assert len(page.images) == len(FIGURES)
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report / "report.md").read_text())
    assert sorted(links) == sorted(f"tiny/{name}" for name in FIGURES)
    assert all((report / link).stat().st_size > 1000 for link in links)
    assert "distill/snapshot_2.safetensors" in (report / "report.md").read_text()


def test_small_images_are_enlarged_to_at_least_64_pixels(report):
    from PIL import Image

    width, height = Image.open(report / "tiny" / "images.png").size
    assert height >= 6 * 64 and width >= 3 * 6 * 64  # 36 digits of 8x8 in three 6 x 6 panels


def test_unfinished_runs_become_notes_and_several_runs_get_a_column_each(run, tmp_path):
    empty = tmp_path / "a" / "tiny"  # the config of a run whose stages have not run
    empty.mkdir(parents=True)
    shutil.copyfile(run / "config.yaml", empty / "config.yaml")
    out = build_report([run, empty], tmp_path / "report")
    text = (out / "report.md").read_text()
    assert "| labels | method | digits (tiny) |" in text  # the second run has no results: no column
    for missing in ("no results.json yet", "the distill stage has not finished", "no init subsets yet"):
        assert missing in text
    assert "## tiny-2" in text and _parsed(out / "index.html").tags.count("img") == len(FIGURES)


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not an mkdt run directory" in err
    assert not (tmp_path / "report").exists()


def test_the_page_loads_in_a_headless_browser(report, tmp_path):
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on PATH; e.g. apt-get install chromium")
    # a copy beside the page that marks, once loaded, how many images the browser decoded
    probe = report / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => document.body.dataset.decoded = "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length);</script>"
    )
    probe.write_text((report / "index.html").read_text().replace("</body>", script + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}"]
        + ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    probe.unlink()
    assert dom.count("<table") == 4 and dom.count("<img") == len(FIGURES)
    assert f'data-decoded="{len(FIGURES)}"' in dom


def _drawn(monkeypatch, run: Path, out: Path) -> dict[str, object]:
    """The initial images and their panel title that the report of ``run`` draws, and the class
    counts of its histogram."""
    from mkdt.reporting import figures

    drawn: dict[str, object] = {}

    def comparison(initial, distilled, path, titles):
        drawn.update(initial=initial, title=titles[0])
        path.write_bytes(b"")

    def histogram(counts, classes, path, title):
        drawn["counts"] = counts
        path.write_bytes(b"")

    monkeypatch.setattr(figures, "image_comparison", comparison)
    monkeypatch.setattr(figures, "class_histogram", histogram)
    build_report([run], out)
    return drawn


def test_the_run_is_read_from_its_stage_records_not_from_config_yaml(run, tmp_path, monkeypatch):
    """A config.yaml that a later command or a hand edit changed (another init subset, seed, pool)
    does not change which images the report draws beside the distilled set."""
    import yaml

    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["distill"]["init"], config["seed"], config["data"]["pool_size"] = "random", 7, 500
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    original = _drawn(monkeypatch, run, tmp_path / "a")
    again = _drawn(monkeypatch, edited, tmp_path / "b")
    assert original["title"] == again["title"] == "initial (high_loss subset of D_real)"
    assert torch.equal(original["initial"], again["initial"])
    assert original["counts"] == again["counts"] and "high_loss subset (distilled)" in again["counts"]


def test_an_init_redone_after_distilling_is_not_drawn_beside_the_distilled_set(run, tmp_path):
    redone = tmp_path / "redone"
    shutil.copytree(run, redone)
    record = json.loads((redone / "init" / "stage.json").read_text())
    record["defining"]["init"]["images"] += 1
    (redone / "init" / "stage.json").write_text(json.dumps(record))
    text = (build_report([redone], tmp_path / "report") / "report.md").read_text()
    assert "initial images skipped: the init stage was redone after distilling" in text
    assert "(redone/grid.png)" in text and "(redone/classes.png)" in text


@pytest.mark.parametrize(
    "rel, data, fragment",
    [
        ("results.json", "[1]", "does not hold result records"),
        ("config.yaml", "- a list\n", "is not an mkdt config"),
        ("evaluate/stage.json", "{}", "is not a stage record"),
    ],
)
def test_damaged_inputs_are_refused_before_anything_is_written(run, tmp_path, rel, data, fragment):
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / rel).write_text(data)
    with pytest.raises(ArtifactError, match=fragment):
        build_report([run, damaged], tmp_path / "report")
    assert not (tmp_path / "report").exists()
