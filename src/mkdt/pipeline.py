"""The stages in order, and running several of them into one run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mkdt import distill, evaluate, experts, init, targets, teacher
from mkdt.artifacts import RunDir, write_text
from mkdt.config import Config, config_to_dict, dump_config
from mkdt.runtime import load_real

StageFn = Callable[..., dict[str, Any]]
STAGES: dict[str, StageFn] = {
    "teacher": teacher.run, "targets": targets.run, "experts": experts.run, "init": init.run,
    "distill": distill.run, "evaluate": evaluate.run,
}


def run_stages(config: Config, out: str | Path, stages: list[str], *,
               force: bool = False) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in pipeline order) into ``out``; finished compatible stages are skipped.

    With ``force`` the named stages are recomputed and every later stage's record is dropped, so
    nothing downstream keeps using results of the old artifacts.
    """
    run_dir = RunDir(out)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    write_text(run_dir.path / "config.yaml", dump_config(config))
    names = list(STAGES)
    if force:
        first = min(names.index(s) for s in stages)
        run_dir.invalidate(names[first:])
    data = load_real(config)
    records = {}
    for name in names:
        if name in stages:
            records[name] = STAGES[name](config, out, force=force, data=data)
            run_dir.write_manifest(config_to_dict(config), names)
    return records
