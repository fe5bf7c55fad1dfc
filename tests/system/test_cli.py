"""The command line: help text, one-line user errors, resume and the progress lines."""

import json

import pytest

from mkdt.cli import main
from mkdt.config import Config, iter_fields, preset_description, preset_names
from mkdt.methods import EVAL_METHODS
from mkdt.store import RunDir
from tests.helpers import TINY


def test_help_documents_every_key_of_the_stage(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for key, _, help_text in iter_fields(Config()):
        assert key in text and help_text.split()[0] in text


def test_user_mistakes_print_one_line_and_exit_2(capsys, tmp_path):
    assert main(["teacher", "--out", str(tmp_path), "experts.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mkdt: error: unknown config key") and err.count("\n") == 1
    assert main(["teacher", "--out", str(tmp_path), "data.name=/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mkdt: error:") and "Traceback" not in err


def test_run_writes_manifest_and_resumes(tmp_path, capsys):
    args = [
        "run",
        "--out",
        str(tmp_path / "run"),
        *TINY,
        f"data.cache_dir={tmp_path / 'c'}",
        "teacher.epochs=1",
    ]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "run/manifest.json").read_text())
    assert set(manifest["stages"]) == {"teacher", "targets", "experts", "init", "distill", "evaluate"}
    results = RunDir(tmp_path / "run").load_results()
    assert {r["method"] for r in results} == set(EVAL_METHODS)
    out, err = capsys.readouterr()
    assert "\r" not in err and "evaluate: 100%" in err  # not a terminal: plain progress lines
    log = (tmp_path / "run/log.txt").read_text()
    assert "stage 1/6: teacher" in log and "evaluate: 100%" in log and "| 10% | MKDT |" in log
    assert "MKDT minus each baseline" in log and "\r" not in log
    assert "MKDT" in out and "stage 1/6: teacher" in out and "stage 6/6: evaluate" in out
    assert "matched window: expert epochs 0-3" in out  # T+ = 2, M = 2
    assert (
        "window check: probing experts [0, 1] at epochs 0 and 3" in out and "MKDT minus each baseline" in out
    )
    assert "window (expert epochs 0-3, " in out.split("window check: ")[2]
    assert json.loads((tmp_path / "run/analysis/window.json").read_text())["experts"] == [0, 1]
    assert manifest["seed"] == 0 and "torch" in manifest["versions"]
    assert (tmp_path / "run/config.yaml").read_text().startswith("seed: 0")
    finished = manifest["stages"]["experts"]["finished"]
    assert main(args) == 0
    again = json.loads((tmp_path / "run/manifest.json").read_text())
    assert again["stages"]["experts"]["finished"] == finished
    assert "stage " not in capsys.readouterr().out  # every stage was skipped
    assert main(["presets"]) == 0 and "demo" in capsys.readouterr().out
    assert main(["datasets"]) == 0 and "tinyimagenet" in capsys.readouterr().out


def test_overrides_may_surround_options(capsys, tmp_path):
    file = tmp_path / "extra.yaml"
    file.write_text("experts: {lr: 0.05}\n")
    args = ["config", "seed=3", "--preset", "demo", "experts.epochs=7", "--config", str(file), "device=cpu"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "seed: 3" in text and "epochs: 7" in text and "lr: 0.05" in text and "device: cpu" in text
    with pytest.raises(SystemExit):
        main(["config", "--no-such-flag"])


def test_log_progress_prints_each_state_once_as_a_plain_line():
    import io

    from mkdt.runtime import LOG_INTERVAL, LineProgress

    out = io.StringIO()
    bar = LineProgress(total=4, desc="work", file=out, mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL)
    bar.update(2)
    bar.display(force=True)
    bar.display(force=True)  # a refresh with nothing new: skipped
    bar.update(2)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split("|")[0].strip() for line in lines] == ["work:   0%", "work:  50%", "work: 100%"]


def test_presets_lists_each_name_with_its_description_the_papers_tables_apart(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    settings, tables = out.split("the paper's tables")
    for name in preset_names():
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert line.endswith(preset_description(name)) and preset_description(name)
        assert name in (tables if name.startswith("table") else settings)
    assert "table5-resnet18" in tables and "cifar10-2pct" in settings
