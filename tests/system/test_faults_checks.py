"""Checks before writing: extended stages, damaged task files and imported sets are refused first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mkdt.cli import main
from mkdt.files import file_sha256, load_tensors
from mkdt.store import RunDir
from tests.system.test_faults import _args
from tests.system.test_faults_rundir import _copy, _damage_same_size, _refused
from tests.system.test_faults_rundir import finished as finished  # the module's fixture, reused


def _as_before_sas(run: Path) -> None:
    """Make ``run``'s init look finished before the SAS subset existed: its indices file without
    ``sas``, recorded at its new size and sha256."""
    store = RunDir(run)
    tensors = load_tensors(store.indices_path)[0]
    store.save_indices({k: tensors[k] for k in ("high_loss", "random")}, tensors["loss"])
    record_path = store.stage_dir("init") / "stage.json"
    record = json.loads(record_path.read_text())
    path = store.indices_path
    entry = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    record["artifacts"]["init/indices.safetensors"] = entry
    record_path.write_text(json.dumps(record))


def test_a_new_distill_variant_checks_the_prerequisites_first(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _damage_same_size(run / "experts/expert_0000.safetensors")
    argv = ["distill", "--out", str(run), "distill.variants=[random]"]
    _refused(argv, run, f"`mkdt experts --repair --out {run}`", capsys)


def test_adding_the_sas_subset_to_an_old_init_checks_the_prerequisites_first(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _as_before_sas(run)
    _damage_same_size(run / "targets/targets.safetensors")
    _refused(["init", "--out", str(run)], run, f"`mkdt targets --repair --out {run}`", capsys)


def test_an_evaluation_of_the_sas_subset_of_an_old_init_is_refused_first(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _as_before_sas(run)
    argv = ["evaluate", "--force", "--out", str(run), "evaluate.methods=[no_pretrain,sas]"]
    _refused(argv, run, f"`mkdt init --out {run}` adds it", capsys)


def test_a_distill_variant_of_an_old_init_without_that_subset_is_refused_first(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _as_before_sas(run)
    argv = ["distill", "--out", str(run), "distill.variants=[sas]"]
    _refused(argv, run, "made before the sas subset existed", capsys)


def test_a_damaged_task_is_refused_before_a_fresh_run_directory_is_made(tmp_path, capsys):
    task = tmp_path / "task"
    for c in range(2):
        for i in range(3):
            path = task / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not a png")
    out = tmp_path / "fresh"
    capsys.readouterr()
    code = main(["run", "--out", str(out), *_args(tmp_path), f"evaluate.tasks=[digits,imagefolder={task}]"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mkdt: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.fixture
def imported(finished, tmp_path, capsys) -> Path:
    """A copy of the finished run with the set ``rows`` imported (three rows of D_real)."""
    run = _copy(finished, tmp_path)
    source = tmp_path / "rows.json"
    source.write_text("[0, 1, 2]")
    assert main(["import", "rows", str(source), "--out", str(run)]) == 0
    capsys.readouterr()
    return run


def test_import_records_the_sha256_of_the_set_it_writes(imported):
    store = RunDir(imported)
    record = json.loads(store.imported_record_path("rows").read_text())
    assert record == {
        "size": store.imported_path("rows").stat().st_size,
        "sha256": file_sha256(store.imported_path("rows")),
    }


def test_same_size_damage_to_an_imported_set_is_refused_before_it_is_read(imported, capsys):
    _damage_same_size(imported / "imported/rows.safetensors")
    argv = ["evaluate", "--force", "--out", str(imported), "evaluate.methods=[no_pretrain,ext:rows]"]
    error = _refused(argv, imported, "sha256", capsys)
    assert str(imported / "imported/rows.safetensors") in error and "--force`" in error
