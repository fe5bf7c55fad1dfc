"""The fault suite: bad inputs give one clean line and change nothing; killed runs resume exactly.

Every case of ``BAD_INPUTS`` runs the CLI in-process against a finished tiny run directory (or a
fresh one where the case needs it) and asserts exit code 2, exactly one ``mkdt: error:`` line on
stderr, no traceback, and that every file already in the run directory is byte-identical
afterwards. ``test_killed_runs_resume_to_the_same_artifacts`` SIGKILLs real ``mkdt run``
subprocesses inside stages and inside artifact writes and checks that rerunning the same command
gives the artifacts of an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mkdt import files
from mkdt.cli import main
from mkdt.nn.models import resnet18
from mkdt.store import RunDir
from tests.helpers import TINY

FAST = ["teacher.epochs=1", "teacher.probe=false", "evaluate.seeds=1", "distill.iterations=2"]


def _args(root: Path, *extra: str) -> list[str]:
    return [*TINY, *FAST, f"data.cache_dir={root / 'cache'}", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A tiny run directory with every stage finished."""
    root = tmp_path_factory.mktemp("faults")
    assert main(["run", "--out", str(root / "run"), *_args(root)]) == 0
    return root


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _image_folder(root: Path, classes: int) -> Path:
    """An ImageFolder tree of random 8x8 PNGs: ``classes`` classes of 6 images."""
    gen = np.random.default_rng(0)
    for c in range(classes):
        for i in range(6):
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(gen.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(path)
    return root


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# (case id, message fragment, setup(root, monkeypatch) -> argv); argv without --out runs on the
# finished run directory
Setup = Callable[[Path, pytest.MonkeyPatch], list[str]]
BAD_INPUTS: list[tuple[str, str, Setup]] = [
    ("unknown key", "did you mean experts.lr", lambda r, m: ["experts.lrr=1"]),
    ("unknown top key", "unknown config key 'nope'", lambda r, m: ["nope=1"]),
    ("not a float", "must be float", lambda r, m: ["experts.lr=abc"]),
    ("not an int", "must be int", lambda r, m: ["experts.num_experts=2.5"]),
    ("zero experts", "experts.num_experts", lambda r, m: ["experts.num_experts=0"]),
    ("not a bool", "must be bool", lambda r, m: ["data.download=maybe"]),
    ("unknown SSL method", "barlow_twins or simclr", lambda r, m: ["teacher.method=byol"]),
    ("unknown network", "convnet, resnet10 or resnet18", lambda r, m: ["teacher.model.arch=vit"]),
    ("save_epochs missing needed ones", "must include", lambda r, m: ["experts.save_epochs=[0,2]"]),
    ("save_epochs out of range", "outside", lambda r, m: ["experts.save_epochs=[0,1,2,3,99]"]),
    ("window beyond the experts", "exceeds experts.epochs", lambda r, m: ["distill.max_start_epoch=9"]),
    ("missing teacher checkpoint", "file not found", lambda r, m: ["teacher.checkpoint=/no/such/file.pt"]),
    ("unknown device", "device", lambda r, m: ["device=tpu"]),
    ("malformed cuda device", "must be auto, cpu, cuda or cuda:N", lambda r, m: ["device=cuda:abc"]),
    ("override without =", "key=value", lambda r, m: ["experts.lr"]),
    ("infinite evaluation lr", "finite number", lambda r, m: ["evaluate.lr=inf"]),
    ("NaN evaluation lr", "finite number", lambda r, m: ["evaluate.lr=nan"]),
    ("NaN alpha_syn lr", "finite number", lambda r, m: ["distill.lr_lr=nan"]),
    ("negative alpha_syn init", "distill.lr_init", lambda r, m: ["distill.lr_init=-1"]),
    ("zero target lr", "distill.lr_targets", lambda r, m: ["distill.lr_targets=0"]),
    ("infinite expert lr", "finite number", lambda r, m: ["experts.lr=inf"]),
    ("negative teacher lr", "teacher", lambda r, m: ["teacher.lr=-0.1"]),
    ("momentum of 1.5", "distill.momentum", lambda r, m: ["distill.momentum=1.5"]),
    ("zero label fraction", "label_fractions", lambda r, m: ["evaluate.label_fractions=[0]"]),
    ("no label fractions", "label_fractions", lambda r, m: ["evaluate.label_fractions=[]"]),
    ("unknown method", "evaluate.methods", lambda r, m: ["evaluate.methods=[magic]"]),
    ("unknown task", "unknown task 'nope'", lambda r, m: ["evaluate.tasks=[nope]"]),
    ("task without root", "name=root", lambda r, m: ["evaluate.tasks=[cifar100=]"]),
    ("moved key", "'distill.images' is now 'init.images'", lambda r, m: ["distill.images=10"]),
    ("resolution of 2", "data.resolution", lambda r, m: ["data.resolution=2"]),
    ("pool of 1", "data.pool_size", lambda r, m: ["data.pool_size=1"]),
    ("negative seed", "seed", lambda r, m: ["seed=-1"]),
    ("unknown precision", "precision", lambda r, m: ["precision=fp16"]),
    ("unknown backend", "distill.backend", lambda r, m: ["distill.backend=fast"]),
    ("unknown init", "distill.init", lambda r, m: ["distill.init=middle"]),
    ("unknown preset", "unknown preset 'nope'", lambda r, m: ["--preset", "nope"]),
    ("missing config file", "config file not found", lambda r, m: ["--config", "/no/such.yaml"]),
    ("invalid YAML", "not valid YAML", lambda r, m: ["--config", str(_write(r / "bad.yaml", "a: [1,"))]),
    (
        "YAML that is a list",
        "must be a mapping",
        lambda r, m: ["--config", str(_write(r / "list.yaml", "- 1\n"))],
    ),
    ("missing dataset folder", "unknown dataset", lambda r, m: ["data.name=/no/such/folder"]),
    (
        "empty ImageFolder",
        "no images",
        lambda r, m: [
            "data.name=imagefolder",
            f"data.root={_folder(r / 'empty')}",
            f"--out={r / 'fresh-empty'}",
        ],
    ),
    (
        "one-class ImageFolder",
        "need at least 2",
        lambda r, m: [
            f"data.name={_image_folder(r / 'one-class', 1)}",
            "data.pool_size=null",
            "init.images=4",
            "teacher.batch_size=2",
            f"--out={r / 'fresh-one-class'}",
            "teacher.probe=true",
        ],
    ),
    (
        "more synthetic images than D_real",
        "init.images (5000) is larger than D_real",
        lambda r, m: ["init.images=5000"],
    ),
    (
        "teacher batch larger than D_real",
        "teacher.batch_size (5000) is larger than D_real",
        lambda r, m: ["teacher.batch_size=5000"],
    ),
    (
        "garbage teacher checkpoint",
        "corrupt checkpoint",
        lambda r, m: [
            f"teacher.checkpoint={_write(r / 'garbage.pt', b'not a checkpoint')}",
            f"--out={r / 'fresh-garbage'}",
        ],
    ),
    (
        "checkpoint of another network",
        "does not fit teacher.model",
        lambda r, m: [
            f"teacher.checkpoint={_save(resnet18(width=8, in_channels=1).state_dict(), r / 'w8.pt')}",
            f"--out={r / 'fresh-w8'}",
        ],
    ),
    (
        "checkpoint that is a list",
        "does not hold a state dict",
        lambda r, m: [
            f"teacher.checkpoint={_save([torch.zeros(2)], r / 'list.pt')}",
            f"--out={r / 'fresh-list'}",
        ],
    ),
    ("finished run, another config", "experts.lr: 0.1 -> 0.05", lambda r, m: ["experts.lr=0.05"]),
    (
        "truncated distilled set",
        "repair it with `mkdt distill --repair",
        lambda r, m: _damage(r, "distill/synthetic.safetensors", truncate=True),
    ),
    (
        "missing expert",
        "repair it with `mkdt experts --repair",
        lambda r, m: _damage(r, "experts/expert_0001.safetensors", truncate=False),
    ),
    (
        "unreadable stage record",
        "redo the stage with `mkdt init --force",
        lambda r, m: _damage(r, "init/stage.json", truncate=True),
    ),
    ("--out is a file", "is a file, not a folder", lambda r, m: [f"--out={_write(r / 'a-file', 'x')}"]),
    ("--out on a read-only file system", "choose a writable --out", lambda r, m: _read_only_out()),
    ("full disk before compute", "not enough free disk", lambda r, m: _tiny_disk(r, m)),
    ("full disk while writing", "the disk is full", lambda r, m: _full_while_writing(r, m)),
]


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _damage(root: Path, rel: str, truncate: bool) -> list[str]:
    """Damage a copy of the finished run and point the command at it."""
    copy = root / f"damaged-{rel.replace('/', '-')}"
    shutil.copytree(root / "run", copy)
    path = copy / rel
    if truncate:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()
    return [f"--out={copy}"]


def _read_only_out() -> list[str]:
    try:
        os.makedirs("/sys/mkdt-fault-test/run")
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EROFS, errno.EACCES):
            return ["--out=/sys/mkdt-fault-test/run"]
    pytest.skip("no read-only file system to write to here")


def _tiny_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(
        files.shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9, 10**4)
    )
    return [f"--out={root / 'fresh-tiny-disk'}"]


def _full_while_writing(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setattr(files, "save_file", _no_space)
    return [f"--out={root / 'fresh-full'}"]


@pytest.mark.parametrize("case, fragment, setup", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gives_one_line_and_changes_nothing(finished, case, fragment, setup, monkeypatch, capsys):
    extra = setup(finished, monkeypatch)
    out = next((a.split("=", 1)[1] for a in extra if a.startswith("--out=")), str(finished / "run"))
    extra = [a for a in extra if not a.startswith("--out=")]
    before = _snapshot(Path(out)) if Path(out).is_dir() else None
    capsys.readouterr()
    code = main(["run", "--out", out, *_args(finished), *extra])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mkdt: error:")]
    assert code == 2, err
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    if before is not None:
        assert _snapshot(Path(out)) == before
    elif case == "full disk while writing":  # a fault during compute: no artifact was made
        made = list(Path(out).rglob("*.safetensors")) if Path(out).is_dir() else []
        assert made == []
    else:  # a fresh run directory: every check comes before it is made, so it is not
        assert not Path(out).is_dir()


def test_there_are_at_least_40_bad_inputs():
    assert len(BAD_INPUTS) >= 40


def test_repair_redoes_only_the_damaged_expert_and_keeps_later_stages(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    before = _snapshot(run)
    kept = (run / "experts/expert_0000.safetensors").stat().st_mtime_ns
    (run / "experts/expert_0001.safetensors").write_bytes(b"damaged")
    assert main(["run", "--out", str(run), *_args(finished)]) == 2
    assert "mkdt experts --repair" in capsys.readouterr().err
    assert main(["experts", "--repair", "--out", str(run), *_args(finished)]) == 0
    assert (run / "experts/expert_0000.safetensors").stat().st_mtime_ns == kept  # not retrained
    after = _snapshot(run)
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"experts/stage.json", "manifest.json", "config.yaml", "log.txt"}  # the same bits again
    assert (run / "distill/stage.json").is_file()  # later stages stay valid
    assert main(["run", "--out", str(run), *_args(finished)]) == 0  # everything finished and intact


def test_orphaned_temp_files_are_removed_and_artifacts_follow_the_umask(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    orphan = _write(tmp_path / "run/experts" / f".expert_0001.safetensors.{files._HOST}.{dead}.abc.tmp", b"x")
    alive = _write(
        tmp_path / "run/experts" / f".expert_0002.safetensors.{files._HOST}.{os.getpid()}.abc.tmp", b"x"
    )
    assert files.remove_orphaned_temp_files(tmp_path / "run") == 1
    assert not orphan.exists() and alive.exists()
    files.write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~files._UMASK


def test_a_dataset_given_by_a_path_is_part_of_the_teachers_definition(tmp_path, capsys):
    first, second = _image_folder(tmp_path / "a", 2), _image_folder(tmp_path / "b", 2)
    (second / "class1" / "5.png").unlink()
    args = [
        "teacher",
        "--out",
        str(tmp_path / "run"),
        *_args(tmp_path),
        "data.name=imagefolder",
        "teacher.batch_size=4",
        "data.pool_size=null",
    ]
    assert main([*args, f"data.root={first}"]) == 0
    assert main([*args, f"data.root={second}"]) == 2  # other images: the teacher is not reused
    assert "data.source" in capsys.readouterr().err


def test_diverged_pretraining_is_marked_not_reported_as_accuracy(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    args = [
        "evaluate",
        "--force",
        "--out",
        str(run),
        *_args(finished),
        "evaluate.lr=1e12",
        "evaluate.methods=[no_pretrain,random]",
    ]
    assert main(args) == 0
    records = {r["method"]: r for r in RunDir(run).load_results()}
    assert records["random"]["mean"] is None and records["random"]["diverged_seeds"] == [0]
    assert records["no_pretrain"]["mean"] is not None
    assert "| diverged |" in (run / "results.md").read_text()


@pytest.mark.parametrize(
    "override, option", [("experts.lr=1e15", "experts.lr"), ("teacher.lr=1e15", "teacher.lr")]
)
def test_training_stops_at_a_non_finite_loss_naming_the_option(tmp_path, override, option, capsys):
    stage = override.split(".")[0]
    assert main(["run", "--out", str(tmp_path / "run"), *_args(tmp_path), override]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mkdt: error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and f"lower {option}" in errors[0]
    assert not (tmp_path / "run" / stage / "stage.json").exists()
