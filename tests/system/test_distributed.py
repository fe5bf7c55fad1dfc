"""torch.distributed with the real launcher: ``torchrun --standalone --nproc_per_node=2`` and gloo
on the CPU, compared with one process (the teacher step, the distillation step, the experts stage
and a whole tiny ``mkdt run``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mkdt.store import RunDir
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "system" / "distributed_worker.py"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = [
    pytest.mark.slow,  # torchrun jobs of two ranks: minutes
    pytest.mark.skipif(
        TORCHRUN is None or not torch.distributed.is_available(),
        reason="needs torchrun and torch.distributed",
    ),
]
ENV = {**os.environ, "MKDT_PROGRESS": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    command = [TORCHRUN, "--standalone", f"--nproc_per_node={ranks}", *args]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _single(*args: str) -> None:
    subprocess.run([sys.executable, *args], env=ENV, check=True, capture_output=True, timeout=600)


@pytest.mark.parametrize("method", ["barlow_twins", "simclr"])
def test_two_ranks_take_the_teacher_step_of_one_process_with_the_global_batch(tmp_path, method):
    _single(str(WORKER), method, str(tmp_path / "one.pt"))
    _torchrun(str(WORKER), method, str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert torch.allclose(one["loss"], two["loss"], rtol=1e-5)
    moved = one["params"].abs().max()
    assert torch.allclose(one["params"], two["params"], rtol=0, atol=1e-5 * moved)
    assert torch.allclose(one["running_mean"], two["running_mean"], rtol=1e-5, atol=1e-8)


def test_two_ranks_take_the_distillation_step_of_one_process(tmp_path):
    _single(str(WORKER), "distill", str(tmp_path / "one.pt"))
    _torchrun(str(WORKER), "distill", str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in ("loss", "images", "targets", "lr"):  # float64: equal up to summation order
        assert torch.allclose(one[key], two[key], rtol=1e-12, atol=1e-12), key
    assert not torch.equal(one["images"], torch.zeros_like(one["images"]))


def _mkdt(out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "-m",
        "mkdt",
        "run",
        "--out",
        str(out),
        *TINY,
        "teacher.probe=false",
        "evaluate.seeds=2",
        "experts.num_experts=3",
        f"data.cache_dir={cache}",
        *extra,
    ]


def test_a_whole_run_under_torchrun_matches_one_process_and_resumes(tmp_path):
    _single(*_mkdt(tmp_path / "one", tmp_path / "cache"))
    done = _torchrun(*_mkdt(tmp_path / "two", tmp_path / "cache"))
    assert done.stdout.count("done: teacher, targets") == 1  # rank 0 alone prints
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in (two / "experts").glob("*.safetensors")) == [
        "expert_0000.safetensors",
        "expert_0001.safetensors",
        "expert_0002.safetensors",
    ]
    # the teacher trains on the global batch with per-rank augmentation streams: another random
    # realisation of the same objective (the step itself is compared above), so shapes, not values
    a, b = load_file(one / "teacher/encoder.safetensors"), load_file(two / "teacher/encoder.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    losses = __import__("json").loads((two / "teacher/stage.json").read_text())["result"]["loss_history"]
    assert losses[-1] < losses[0]
    records = [RunDir(d).load_results() for d in (one, two)]
    assert [(r["method"], r["label_fraction"], len(r["accuracies"])) for r in records[0]] == [
        (r["method"], r["label_fraction"], len(r["accuracies"])) for r in records[1]
    ]
    before = {p: p.stat().st_mtime_ns for p in two.rglob("*.safetensors")}
    _torchrun(*_mkdt(two, tmp_path / "cache"))  # finished: every stage skipped on every rank
    assert {p: p.stat().st_mtime_ns for p in two.rglob("*.safetensors")} == before


def test_experts_under_torchrun_equal_one_process_bitwise(tmp_path):
    # with the same teacher and targets, expert k does not depend on which rank trains it
    _single(*_mkdt(tmp_path / "one", tmp_path / "cache"))
    two = tmp_path / "two"
    for stage in ("teacher", "targets"):
        shutil.copytree(tmp_path / "one" / stage, two / stage)
    _torchrun("-m", "mkdt", "experts", "--out", str(two), *_mkdt(two, tmp_path / "cache")[5:])
    for k in range(3):
        name = f"experts/expert_{k:04d}.safetensors"
        a, b = load_file(tmp_path / "one" / name), load_file(two / name)
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert (two / "experts/stage.json").is_file()


def test_evaluation_under_torchrun_gives_the_single_process_table(tmp_path):
    _single(*_mkdt(tmp_path / "one", tmp_path / "cache"))
    two = tmp_path / "two"
    shutil.copytree(tmp_path / "one", two)
    for name in ("results.json", "results.md"):
        (two / name).unlink()
    shutil.rmtree(two / "evaluate")
    _torchrun("-m", "mkdt", "evaluate", "--out", str(two), *_mkdt(two, tmp_path / "cache")[5:])
    assert (two / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()

    def without_costs(run):  # the last section of results.md: seconds, which differ between runs
        return (run / "results.md").read_text().split("Cost of each set")[0]

    assert without_costs(two) == without_costs(tmp_path / "one")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_killed_torchrun_job_resumes_with_the_same_command(tmp_path):
    import signal
    import time

    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", *_mkdt(tmp_path / "run", tmp_path / "cache")]
    job = subprocess.Popen(
        command,
        env={**ENV, "MKDT_TEST_WRITE_DELAY": "0.3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "run/distill/checkpoint.pt").exists() and job.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.poll() is None, "the job ended before distillation checkpointed"
    ranks = _children(job.pid)  # torchrun starts each rank in a session of its own
    os.killpg(job.pid, signal.SIGKILL)  # the launcher
    for rank in ranks:
        os.kill(rank, signal.SIGKILL)
    job.wait()
    while any(_alive(rank) for rank in ranks):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not (tmp_path / "run/distill/stage.json").exists()
    _torchrun(*_mkdt(tmp_path / "run", tmp_path / "cache"))
    assert (tmp_path / "run/evaluate/stage.json").is_file()
    assert not list((tmp_path / "run").rglob("*.tmp"))


def test_krr_st_under_torchrun_gives_the_single_process_set(tmp_path):
    # every rank runs the whole KRR-ST loop with the same draws and rank 0 writes: one result, the
    # bits of one process given the same teacher, targets and init subsets
    krr = ["evaluate.methods=[no_pretrain,krr_st]", "krr_st.iterations=3", "krr_st.num_models=2"]
    krr += ["krr_st.online_iterations=3", "krr_st.outer_batch_size=32", "krr_st.checkpoint_every=2"]
    _single(*_mkdt(tmp_path / "one", tmp_path / "cache", *krr))
    two = tmp_path / "two"
    for stage in ("teacher", "targets", "experts", "init"):
        shutil.copytree(tmp_path / "one" / stage, two / stage)
    done = _torchrun("-m", "mkdt", "krr_st", "--out", str(two), *_mkdt(two, tmp_path / "cache", *krr)[5:])
    assert done.stdout.count("done: krr_st") == 1
    name = "krr_st/synthetic.safetensors"
    a, b = load_file(tmp_path / "one" / name), load_file(two / name)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (two / "krr_st/stage.json").is_file() and RunDir(tmp_path / "one").load_results()


def test_targets_under_torchrun_equal_one_process(tmp_path):
    _single(*_mkdt(tmp_path / "one", tmp_path / "cache"))
    two = tmp_path / "two"
    shutil.copytree(tmp_path / "one" / "teacher", two / "teacher")
    _torchrun("-m", "mkdt", "targets", "--out", str(two), *_mkdt(two, tmp_path / "cache")[5:])
    one_z = load_file(tmp_path / "one/targets/targets.safetensors")["targets"]
    two_z = load_file(two / "targets/targets.safetensors")["targets"]
    assert one_z.shape == two_z.shape and torch.allclose(one_z, two_z, rtol=1e-5, atol=1e-6)
