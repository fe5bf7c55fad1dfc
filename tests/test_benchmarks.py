"""The benchmark scripts stay runnable: smoke runs on tiny settings (their numbers are not checked)."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
stages = pytest.importorskip("stages")


def test_stage_time_estimate_scales_each_stage(tmp_path, capsys):
    out = tmp_path / "json"
    stages.main(["--preset", "demo", "--out", str(tmp_path / "run"), "--iterations", "2", "--json", str(out),
                 *TINY, f"data.cache_dir={tmp_path / 'cache'}", "experts.num_experts=4",
                 "teacher.epochs=10", "distill.iterations=50", "evaluate.seeds=3"])
    rows = {r["stage"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["data", "teacher", "targets", "experts", "init", "distill", "evaluate", "total"]
    assert rows["teacher"]["ran"] == "3 epochs" and rows["teacher"]["full"] == "10 epochs"
    assert rows["experts"]["estimated_seconds"] == pytest.approx(4 * rows["experts"]["measured_seconds"])
    assert rows["evaluate"]["estimated_seconds"] == pytest.approx(3 * rows["evaluate"]["measured_seconds"])
    assert rows["distill"]["estimated_seconds"] > 10 * rows["distill"]["measured_seconds"]
    assert rows["teacher"]["estimated_seconds"] > rows["teacher"]["measured_seconds"]
    assert rows["total"]["estimated_seconds"] == pytest.approx(
        sum(r["estimated_seconds"] for name, r in rows.items() if name != "total"))
    assert "estimated full run" in capsys.readouterr().out
