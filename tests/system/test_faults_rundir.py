"""Run directories: refusals change nothing, same-size damage is found, one writer, own config."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mkdt.cli import main
from mkdt.store import RunDir
from tests.helpers import TINY
from tests.system.test_faults import _args, _snapshot


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run directory with every stage finished (its config.yaml holds the tiny settings)."""
    root = tmp_path_factory.mktemp("rundir")
    assert main(["run", "--out", str(root / "run"), *_args(root)]) == 0
    return root / "run"


def _copy(finished: Path, tmp_path: Path, *unfinished: str) -> Path:
    """A copy of the finished run with the records of ``unfinished`` stages dropped."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    RunDir(run).invalidate(list(unfinished))
    return run


def _refused(argv: list[str], run: Path, fragment: str, capsys) -> str:
    """Run the CLI and check the refusal: exit 2, one ``mkdt: error:`` line holding ``fragment``,
    no traceback, ``run`` byte-identical. Returns the error line."""
    before = _snapshot(run)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mkdt: error:")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert _snapshot(run) == before
    return errors[0]


# (case id, unfinished stages of the copy, argv after --out RUN, fragment of the error)
REFUSALS = [
    ("a prerequisite made with another config", ["distill", "evaluate"], ["distill", "experts.lr=0.05"],
     "experts.lr: 0.1 -> 0.05"),
    ("a prerequisite not finished", ["init", "distill", "evaluate"], ["evaluate"],
     "no finished init in {run}; run `mkdt init --out {run}` first"),
    ("an imported set that is missing", [],
     ["evaluate", "--force", "evaluate.methods=[no_pretrain,ext:nope]"],
     "run `mkdt import nope SOURCE --out {run}` first"),
    ("an MTT-SSL set that is missing", [],
     ["evaluate", "--force", "evaluate.methods=[no_pretrain,mtt_ssl]"],
     "run `mkdt analyze mtt --out {run}` first"),
    ("a variant the distill stage did not make", [],
     ["evaluate", "--force", "distill.variants=[random]", "evaluate.methods=[no_pretrain,mkdt_random]"],
     "has no variant random"),
]  # fmt: skip


@pytest.mark.parametrize("case, unfinished, argv, fragment", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_command_leaves_the_run_directory_byte_identical(
    finished, tmp_path, capsys, case, unfinished, argv, fragment
):
    run = _copy(finished, tmp_path, *unfinished)
    _refused([argv[0], "--out", str(run), *argv[1:]], run, fragment.format(run=run), capsys)


def _damage_same_size(path: Path) -> bytes:
    """Overwrite one byte near the end of ``path`` (a float of a tensor file), keeping its size;
    returns the original bytes."""
    data = path.read_bytes()
    at = len(data) - 3
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :])
    return data


def test_a_repair_of_another_config_is_refused_before_deleting_anything(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "experts/expert_0001.safetensors").unlink()
    argv = ["experts", "--repair", "--out", str(run), "experts.lr=0.05"]  # would retrain every expert
    _refused(argv, run, "experts.lr: 0.1 -> 0.05", capsys)


def test_a_repair_whose_prerequisite_is_damaged_is_refused_naming_its_repair(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _damage_same_size(run / "distill/synthetic.safetensors")
    _damage_same_size(run / "experts/expert_0000.safetensors")
    _refused(["distill", "--repair", "--out", str(run)], run, f"`mkdt experts --repair --out {run}`", capsys)


def test_a_refused_import_leaves_the_run_directory_byte_identical(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    source = tmp_path / "indices.json"
    source.write_text("[0, 1, 100000]")
    _refused(["import", "bad", str(source), "--out", str(run)], run, "100000", capsys)


# (stage, artifact): one of each kind of artifact
ARTIFACTS = [
    ("teacher", "teacher/encoder.safetensors"),
    ("targets", "targets/targets.safetensors"),
    ("experts", "experts/expert_0001.safetensors"),
    ("init", "init/indices.safetensors"),
    ("distill", "distill/synthetic.safetensors"),
    ("evaluate", "results.json"),
]


@pytest.mark.parametrize("stage, rel", ARTIFACTS, ids=[a[1] for a in ARTIFACTS])
def test_same_size_damage_is_found_and_the_printed_repair_restores_the_same_bits(
    finished, tmp_path, capsys, stage, rel
):
    run = _copy(finished, tmp_path)
    original = _damage_same_size(run / rel)
    repair = f"`mkdt {stage} --repair --out {run}`"
    error = _refused(["run", "--out", str(run)], run, repair, capsys)  # no --preset: the run's config
    assert str(run / rel) in error and "sha256" in error
    command = shlex.split(re.search(r"`(mkdt [^`]*--repair[^`]*)`", error)[1])
    assert main(command[1:]) == 0  # copied from the message as printed
    assert (run / rel).read_bytes() == original
    capsys.readouterr()
    assert main(["run", "--out", str(run)]) == 0
    assert "stage " not in capsys.readouterr().out  # the later stages stayed valid


def test_an_existing_run_is_continued_with_its_recorded_config(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    assert main(["run", "--out", str(run)]) == 0  # no --preset, no overrides: nothing to redo
    assert "stage " not in capsys.readouterr().out
    _refused(["evaluate", "--out", str(run), "evaluate.seeds=2"], run, "evaluate.seeds: 1 -> 2", capsys)
    _refused(["run", "--out", str(run), "--preset", "demo"], run, "made with a different config", capsys)
    assert main(["evaluate", "--out", str(run), "evaluate.seeds=2", "--force"]) == 0  # as advised
    assert len(RunDir(run).load_results()[0]["accuracies"]) == 2


def _command(out: Path, cache: Path, *stages: str) -> list[str]:
    args = [*TINY, "teacher.probe=false", "evaluate.seeds=1", f"data.cache_dir={cache}"]
    return [sys.executable, "-m", "mkdt", *(stages or ["run"]), "--out", str(out), *args]


def _env(delay: float = 0.0) -> dict[str, str]:
    return {**os.environ, "MKDT_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKDT_TEST_WRITE_DELAY": str(delay)}


def _holder(out: Path) -> dict[str, object]:
    try:
        holder: dict[str, object] = json.loads((out / ".lock").read_text())
    except (OSError, ValueError):
        return {}
    return holder


@pytest.mark.slow  # two real mkdt runs, one killed
def test_one_process_per_run_directory_and_a_killed_holders_lock_is_taken_over(finished, tmp_path):
    out, cache = tmp_path / "run", finished.parent / "cache"
    first = subprocess.Popen(  # kept busy: each artifact write held open for a second
        _command(out, cache), env=_env(delay=1.0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while not (_holder(out).get("pid") == first.pid and (out / "config.yaml").is_file()):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
        second = subprocess.run(_command(out, cache), env=_env(), capture_output=True, text=True, timeout=300)
        errors = [line for line in second.stderr.splitlines() if line.startswith("mkdt: error:")]
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert len(errors) == 1 and f"pid {first.pid} on " in errors[0] and "mkdt run --out" in errors[0]
        assert first.poll() is None  # the first one carries on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert _holder(out).get("pid") == first.pid  # a stale lock, left by the killed process
    again = subprocess.run(_command(out, cache, "teacher"), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (out / "teacher/stage.json").is_file() and not (out / ".lock").exists()
