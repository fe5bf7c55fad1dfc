"""The benchmark scripts stay runnable: smoke runs on tiny settings (their timings are not checked).

teacher.py and targets.py are left out: their eight child processes would add a minute of imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY

pytestmark = pytest.mark.slow  # the benchmark scripts as subprocesses: about a minute

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
stages = pytest.importorskip("stages")


def test_stage_time_estimate_scales_each_stage(tmp_path, capsys):
    out = tmp_path / "json"
    stages.main(
        [
            "--preset",
            "demo",
            "--out",
            str(tmp_path / "run"),
            "--iterations",
            "2",
            "--json",
            str(out),
            *TINY,
            f"data.cache_dir={tmp_path / 'cache'}",
            "experts.num_experts=4",
            "teacher.epochs=10",
            "distill.iterations=50",
            "evaluate.seeds=3",
        ]
    )
    rows = {r["stage"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["data", "teacher", "targets", "experts", "init", "distill", "evaluate", "total"]
    assert rows["teacher"]["ran"] == "3 epochs" and rows["teacher"]["full"] == "10 epochs"
    assert rows["experts"]["estimated_seconds"] == pytest.approx(4 * rows["experts"]["measured_seconds"])
    assert rows["evaluate"]["estimated_seconds"] == pytest.approx(3 * rows["evaluate"]["measured_seconds"])
    assert rows["distill"]["estimated_seconds"] > 10 * rows["distill"]["measured_seconds"]
    assert rows["teacher"]["estimated_seconds"] > rows["teacher"]["measured_seconds"]
    assert rows["total"]["estimated_seconds"] == pytest.approx(
        sum(r["estimated_seconds"] for name, r in rows.items() if name != "total")
    )
    assert "estimated full run" in capsys.readouterr().out


def _run(script, *args, tmp_path):
    out = tmp_path / f"{script}.json"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{script}.py"), *args, "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "MKDT_PROGRESS": "0"},
    )
    return json.loads(out.read_text())


def test_distill_benchmark_records_both_backends(tmp_path):
    records = _run(
        "distill",
        "--device",
        "cpu",
        "--width",
        "4",
        "--batch-syn",
        "4",
        "--images",
        "8",
        "--steps",
        "2",
        "--iterations",
        "1",
        tmp_path=tmp_path,
    )
    assert [r["backend"] for r in records] == ["unrolled", "recompute"]
    for r in records:  # the fields the JSON promises
        assert {
            "backend",
            "syn_steps",
            "batch_syn",
            "width",
            "seconds_per_iteration",
            "peak_memory_mb",
            "device",
        } <= set(r)
        assert r["syn_steps"] == 2 and r["seconds_per_iteration"] > 0
    assert records[1]["time_vs_unrolled"] == pytest.approx(
        records[1]["seconds_per_iteration"] / records[0]["seconds_per_iteration"]
    )


def test_experts_benchmark_batched_matches_one_at_a_time(tmp_path):
    records = _run(
        "experts",
        "--device",
        "cpu",
        "--experts",
        "2",
        "--width",
        "4",
        "--images",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        tmp_path=tmp_path,
    )
    assert [r["mode"] for r in records] == ["one-at-a-time", "batched"]
    assert records[1]["max_weight_diff"] < 1e-4


def test_evaluate_benchmark_grid_together_matches_one_at_a_time(tmp_path):
    records = _run(
        "evaluate",
        "--device",
        "cpu",
        "--seeds",
        "2",
        "--width",
        "4",
        "--images",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        tmp_path=tmp_path,
    )
    assert [r["mode"][:3] for r in records] == ["(a)", "(b)", "(c)", "(d)"]
    assert [r["at_once"] for r in records] == [1, 4, 8, 1]
    assert all(r["students"] == 8 and r["max_weight_diff"] < 1e-4 for r in records)


def test_distributed_benchmark_runs_one_and_two_ranks(tmp_path):
    records = _run("distributed", "--iterations", "1", tmp_path=tmp_path)
    assert [(r["work"], r["ranks"]) for r in records] == [
        ("distill", 1),
        ("teacher", 1),
        ("distill", 2),
        ("teacher", 2),
    ]
    assert all(r["seconds_per_step"] > 0 for r in records) and records[0]["ratio_to_1_rank"] == 1
