"""CLI faults around the stages: report, config files, path options, closed pipes, locales, killed exports."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mkdt.cli import EXIT_CLOSED_OUTPUT, main
from tests.system.test_faults import _args, _snapshot, _write, finished  # noqa: F401 - finished: a fixture

SRC = Path(__file__).resolve().parents[2] / "src"
RUN = "run"  # the finished run directory inside the fixture's root


def _copy(root: Path, name: str) -> Path:
    """A copy of the finished run, to damage."""
    copy = root / name
    if not copy.exists():
        shutil.copytree(root / RUN, copy)
    return copy


def _damaged(root: Path, name: str, rel: str, data: bytes | str) -> Path:
    """A copy of the finished run whose file ``rel`` holds ``data``."""
    copy = _copy(root, name)
    _write(copy / rel, data)
    return copy


def _truncated(root: Path, name: str, rel: str) -> Path:
    copy = _copy(root, name)
    path = copy / rel
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


def _not_writable(root: Path) -> Path:
    """A folder this process cannot write in: a read-only folder, or for root (who may write in any
    folder) one in /sys; skips the test where neither exists."""
    if os.geteuid() != 0:
        folder = root / "read-only"
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        return folder / "report"
    try:
        os.makedirs("/sys/mkdt-fault-test/report")
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            return Path("/sys/mkdt-fault-test/report")
    pytest.skip("no folder that cannot be written here")


def _deep_yaml(root: Path) -> Path:
    return _write(root / "deep.yaml", "seed: " + "[" * 5000 + "]" * 5000 + "\n")


def _home_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Path | None]:
    """``--out=~/home-file`` with $HOME at ``root``, where home-file is a file."""
    monkeypatch.setenv("HOME", str(root))
    _write(root / "home-file", "x")
    return _on_run(root, "--out=~/home-file")


def _report(run: Path, out: Path | str) -> tuple[list[str], Path | None]:
    return ["report", str(run), "--out", str(out)], run


def _on_run(root: Path, *extra: str) -> tuple[list[str], Path | None]:
    """``mkdt run`` on the finished run with ``extra``."""
    return ["run", "--out", str(root / RUN), *_args(root), *extra], root / RUN


# (case id, message fragment, setup(root, monkeypatch) -> (argv, run directory that must not change))
Setup = Callable[[Path, pytest.MonkeyPatch], tuple[list[str], Path | None]]
CASES: list[tuple[str, str, Setup]] = [
    # mkdt report: damaged inputs, an --out that cannot be written
    (
        "report: results.json not a list of records",
        "does not hold result records",
        lambda r, m: _report(_damaged(r, "results-object", "results.json", '{"a": 1}'), r / "rep"),
    ),
    (
        "report: results.json records without fields",
        "does not hold result records",
        lambda r, m: _report(_damaged(r, "results-ints", "results.json", "[1, 2]"), r / "rep"),
    ),
    (
        "report: truncated results.json",
        "cannot read",
        lambda r, m: _report(_truncated(r, "results-cut", "results.json"), r / "rep"),
    ),
    (
        "report: binary results.json",
        "cannot read",
        lambda r, m: _report(_damaged(r, "results-binary", "results.json", b"\xff\xfe\x00\x81"), r / "rep"),
    ),
    (
        "report: binary config.yaml",
        "config.yaml",
        lambda r, m: _report(_damaged(r, "config-binary", "config.yaml", b"\xff\xfe\x00\x81"), r / "rep"),
    ),
    (
        "report: config.yaml not YAML",
        "cannot read",
        lambda r, m: _report(_damaged(r, "config-bad", "config.yaml", "data: [\n"), r / "rep"),
    ),
    (
        "report: empty config.yaml",
        "is not an mkdt config",
        lambda r, m: _report(_damaged(r, "config-empty", "config.yaml", ""), r / "rep"),
    ),
    (
        "report: truncated stage record",
        "redo the stage with `mkdt init --force",
        lambda r, m: _report(_truncated(r, "record-cut", "init/stage.json"), r / "rep"),
    ),
    (
        "report: stage record that is a list",
        "is not a stage record",
        lambda r, m: _report(_damaged(r, "record-list", "distill/stage.json", "[1, 2]"), r / "rep"),
    ),
    (
        "report: stage record without its time",
        "is not a stage record",
        lambda r, m: _report(
            _damaged(r, "record-fields", "teacher/stage.json", '{"defining": {}, "result": {}}'), r / "rep"
        ),
    ),
    (
        "report: --out is a file",
        "is a file, not a folder",
        lambda r, m: _report(r / RUN, _write(r / "a-file", "x")),
    ),
    (
        "report: --out below a file",
        "is a file, not a folder",
        lambda r, m: _report(r / RUN, _write(r / "b-file", "x") / "report"),
    ),
    (
        "report: --out not writable",
        "choose a writable --out",
        lambda r, m: _report(r / RUN, _not_writable(r)),
    ),
    ("report: empty RUN", "RUN is empty", lambda r, m: (["report", "", "--out", str(r / "rep")], None)),
    # config files and overrides
    (
        "--config a binary file",
        "is not UTF-8 text",
        lambda r, m: _on_run(r, "--config", str(_write(r / "binary.yaml", bytes(range(256))))),
    ),
    (
        "--config nested too deeply",
        "nested too deeply",
        lambda r, m: _on_run(r, "--config", str(_deep_yaml(r))),
    ),
    (
        "override nested too deeply",
        "nested too deeply",
        lambda r, m: _on_run(r, "seed=" + "[" * 5000 + "]" * 5000),
    ),
    (
        "--config with a key twice",
        "key 'seed' is given twice (lines 1 and 3)",
        lambda r, m: _on_run(r, "--config", str(_write(r / "twice.yaml", "seed: 1\nexperts: {}\nseed: 2\n"))),
    ),
    (
        "--config with a nested key twice",
        "key 'lr' is given twice (lines 2 and 3)",
        lambda r, m: _on_run(r, "--config", str(_write(r / "twice2.yaml", "experts:\n  lr: 1\n  lr: 2\n"))),
    ),
    (
        "override with a key twice",
        "key 'seeds' is given twice",
        lambda r, m: _on_run(r, "evaluate={seeds: 1, seeds: 2}"),
    ),
    # lists whose repeats would repeat work
    (
        "a method twice",
        "'mkdt' is listed twice",
        lambda r, m: _on_run(r, "evaluate.methods=[mkdt,random,mkdt]"),
    ),
    (
        "a label fraction twice",
        "evaluate.label_fractions: 0.5 is listed twice",
        lambda r, m: _on_run(r, "evaluate.label_fractions=[0.5,0.1,0.5]"),
    ),
    (
        "a task twice",
        "evaluate.tasks: 'digits' is listed twice",
        lambda r, m: _on_run(r, "evaluate.tasks=[digits,digits]"),
    ),
    ("a protocol twice", "evaluate.protocols", lambda r, m: _on_run(r, "evaluate.protocols=[probe,probe]")),
    (
        "a variant twice",
        "'random' is listed twice",
        lambda r, m: _on_run(r, "distill.variants=[random,random]"),
    ),
    (
        "a snapshot twice",
        "distill.snapshots: 1 is listed twice",
        lambda r, m: _on_run(r, "distill.snapshots=[1,1]"),
    ),
    # empty and ~ path options
    ("empty --preset", "--preset is empty", lambda r, m: _on_run(r, "--preset", "")),
    ("empty --out", "--out is empty", lambda r, m: (["run", "--out", "", *_args(r)], None)),
    ("empty --config", "--config is empty", lambda r, m: _on_run(r, "--config", "")),
    ("empty --to", "--to is empty", lambda r, m: (["export", str(r / RUN), "--to", ""], r / RUN)),
    ("empty SOURCE", "SOURCE is empty", lambda r, m: (["import", "x", "", "--out", str(r / RUN)], r / RUN)),
    ("--out=~/... a file in $HOME", "is a file, not a folder", _home_file),
    (
        "analyze theorem --out a file, before computing",
        "is a file, not a folder",
        lambda r, m: (["analyze", "theorem", "--out", str(_write(r / "c-file", "x"))], None),
    ),
    (
        "export --to a file",
        "is a file, not a folder",
        lambda r, m: (["export", str(r / RUN), "--to", str(_write(r / "d-file", "x"))], r / RUN),
    ),
]


@pytest.mark.parametrize("case, fragment, setup", CASES, ids=[c[0] for c in CASES])
def test_fault_gives_one_line_and_changes_nothing(finished, case, fragment, setup, monkeypatch, capsys):  # noqa: F811
    argv, run = setup(finished, monkeypatch)
    before = _snapshot(run) if run is not None else None
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mkdt: error:")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    if run is not None:
        assert _snapshot(run) == before
    assert not (finished / "rep").exists()  # a refused report writes nothing


def test_there_are_at_least_20_fault_cases():
    assert len(CASES) >= 20


def test_tilde_after_equals_is_expanded_in_every_path_option(finished, tmp_path, monkeypatch, capsys):  # noqa: F811
    """``--out=~/run`` (the shell leaves the ~) is the run in $HOME, for an analysis, a report and
    an export alike; nothing lands in a folder named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    shutil.copytree(finished / RUN, tmp_path / "run")
    fast = ["--experts=0", "--epochs=0,1"]
    assert main(["analyze", "trajectories", "--out=~/run", *_args(finished), *fast]) == 0
    assert (tmp_path / "run" / "analysis" / "trajectories.md").is_file()
    assert main(["report", "~/run", "--out=~/report"]) == 0
    assert (tmp_path / "report" / "index.html").is_file()
    assert main(["export", "~/run", "--to=~/exported"]) == 0
    assert len(list((tmp_path / "exported" / "images").iterdir())) == 40
    assert list((tmp_path / "cwd").iterdir()) == []


def _mkdt(*argv: str | bytes, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``python -m mkdt ARGV`` of this checkout in a subprocess (one thread)."""
    base = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mkdt", *argv], env={**base, **(env or {})}, **kwargs)


@pytest.mark.slow  # a real mkdt run, twice
def test_a_closed_stdout_ends_the_run_quietly_and_the_rerun_resumes(finished, tmp_path):  # noqa: F811
    """``mkdt run ... | head -1``: exit status 141, nothing on stderr but what the run printed (no
    traceback, no "Exception ignored" at exit); the same command then finishes the run."""
    argv = ["run", "--out", str(tmp_path / "run"), *_args(finished)]
    proc = _mkdt(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().startswith(b"mkdt: teacher, targets")
    proc.stdout.close()  # the reader goes away, as head does after its line
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.wait(timeout=600) == EXIT_CLOSED_OUTPUT, err
    assert "Traceback" not in err and "Exception ignored" not in err and "mkdt: error" not in err
    rerun = _mkdt(*argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err2 = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err2.decode()
    assert all((tmp_path / "run" / stage / "stage.json").is_file() for stage in ("teacher", "evaluate"))


@pytest.mark.slow  # a real mkdt run per locale
@pytest.mark.parametrize(
    "env, name",
    [
        ({"LC_ALL": "C", "PYTHONUTF8": "0"}, "ré-sumé".encode()),  # ASCII locale, no UTF-8 mode
        ({"LC_ALL": "C"}, "ré-sumé".encode()),  # the C locale, Python's UTF-8 mode
        ({"LC_ALL": "C", "PYTHONUTF8": "0"}, b"bad-\xff-name"),  # a path that is not UTF-8
        ({"LC_ALL": "C.UTF-8"}, b"bad-\xff-name"),
    ],
    ids=["C-locale", "C-locale-utf8-mode", "C-locale-undecodable", "utf8-locale-undecodable"],
)
def test_non_ascii_paths_under_any_locale_print_and_log(finished, tmp_path, env, name):  # noqa: F811
    """A run directory whose name is not ASCII (or not UTF-8) under the C locale: the command
    works, prints its folder, and log.txt is UTF-8 text (an undecodable byte as an escape)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONIOENCODING"} | env
    out = os.fsencode(tmp_path) + b"/" + name
    fast = [*_args(finished), "teacher.warmup_epochs=0"]
    proc = _mkdt("teacher", "--out", out, *fast, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert b"Traceback" not in stderr
    assert stdout.strip().endswith(out)  # the path's own bytes
    log = Path(os.fsdecode(out)) / "log.txt"
    assert "stage 1/6: teacher" in log.read_bytes().decode("utf-8")  # valid UTF-8 throughout
    report = _mkdt(
        "report", out, "--out", out + b"-report", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stderr = report.communicate(timeout=600)[1]
    assert report.returncode == 0 and b"Traceback" not in stderr, stderr.decode(errors="replace")


@pytest.mark.slow  # a real mkdt export, killed
def test_a_killed_export_leaves_no_hidden_folder_after_the_next_one(finished, tmp_path):  # noqa: F811
    """SIGKILL inside ``mkdt export``'s writes leaves its hidden folder beside DIR; the next export
    there removes it and writes DIR."""
    target = tmp_path / "exported"
    proc = _mkdt("export", str(finished / RUN), "--to", str(target), env={"MKDT_TEST_WRITE_DELAY": "60"})
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in tmp_path.iterdir()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(0.5)  # inside the delayed write of targets.safetensors
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".exported.")]
    assert len(hidden) == 1 and not target.exists()
    again = _mkdt("export", str(finished / RUN), "--to", str(target))
    assert again.wait(timeout=600) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert len(list((target / "images").iterdir())) == 40 and (target / "README.md").is_file()
