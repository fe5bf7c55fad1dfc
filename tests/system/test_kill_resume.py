"""Kill-and-resume: a real ``mkdt run`` SIGKILLed inside every stage, and inside artifact writes
(held open by the ``MKDT_TEST_WRITE_DELAY`` hook of :mod:`mkdt.files`), then run again with the same
command, ends with artifacts byte-identical to an uninterrupted run's and no temporary files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.slow  # real runs killed and resumed: minutes

ARGS = [*TINY, "teacher.probe=false", "evaluate.seeds=1"]
# KRR-ST too: a tiny krr_st stage (checkpoints after steps 2 and 4) and its evaluation
ARGS += ["evaluate.methods=[no_pretrain,random,sas,high_loss,full,krr_st,mkdt]", "krr_st.iterations=4"]
ARGS += ["krr_st.num_models=2", "krr_st.online_iterations=3", "krr_st.outer_batch_size=64"]
ARGS += ["krr_st.checkpoint_every=2"]
# files that hold timestamps, timings or a log of the attempts
VOLATILE = {"stage.json", "manifest.json", "checkpoint.pt", "partial.json", "log.txt"}


def _command(out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "mkdt", "run", "--out", str(out), *ARGS, f"data.cache_dir={cache}"]


def _env(delay: float = 0.0) -> dict[str, str]:
    return {**os.environ, "MKDT_PROGRESS": "0", "OMP_NUM_THREADS": "1", "MKDT_TEST_WRITE_DELAY": str(delay)}


def _artifacts(folder: Path) -> dict[str, bytes]:
    """Every file but the VOLATILE ones, results.json without its costs and results.md without its
    last section, the costs (wall and CPU seconds)."""
    files = {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in VOLATILE
    }
    if "results.json" in files:
        results = json.loads(files["results.json"])
        files["results.json"] = json.dumps({k: v for k, v in results.items() if k != "costs"}).encode()
        files["results.md"] = files["results.md"].split(b"Cost of each set")[0]
    return files


def _writing(folder: str, name: str) -> Callable[[Path], bool]:
    return lambda run: any((run / folder).glob(f".{name}.*.tmp"))


def _exists(rel: str) -> Callable[[Path], bool]:
    return lambda run: (run / rel).is_file()


KILLS: list[tuple[str, Callable[[Path], bool]]] = [
    ("teacher: inside a checkpoint write", _writing("teacher", "checkpoint.pt")),
    ("teacher: between checkpoints", _exists("teacher/checkpoint.pt")),
    ("targets: inside the write", _writing("targets", "targets.safetensors")),
    ("experts: inside an expert write", _writing("experts", "expert_0000.safetensors")),
    ("experts: between experts", _exists("experts/expert_0000.safetensors")),
    ("init: inside the write", _writing("init", "indices.safetensors")),
    ("distill: inside a checkpoint write", _writing("distill", "checkpoint.pt")),
    ("distill: inside the set's write", _writing("distill", "synthetic.safetensors")),
    ("krr_st: inside a checkpoint write", _writing("krr_st", "checkpoint.pt")),
    ("krr_st: inside the set's write", _writing("krr_st", "synthetic.safetensors")),
    ("evaluate: after the first pre-training", _exists("evaluate/partial.json")),
    ("evaluate: inside the results write", _writing(".", "results.json")),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("kill")
    subprocess.run(_command(root / "reference", root / "cache"), env=_env(), check=True, capture_output=True)
    return root, _artifacts(root / "reference")


@pytest.mark.parametrize("point, reached", KILLS, ids=[k[0] for k in KILLS])
def test_killed_runs_resume_to_the_same_artifacts(reference, point, reached):
    root, expected = reference
    out = root / point.replace(" ", "-").replace(":", "").replace("'", "")
    process = subprocess.Popen(
        _command(out, root / "cache"),
        env=_env(delay=0.3),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not reached(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before reaching '{point}'"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "evaluate" / "stage.json").exists()  # it really was interrupted
    again = subprocess.run(_command(out, root / "cache"), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert _artifacts(out) == expected
    assert not list(out.rglob("*.tmp"))  # the killed write's temporary file was cleaned up
