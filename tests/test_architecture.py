"""The package's layers, checked on its import graph (read from the source, nothing imported)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

from mkdt.graph import STAGES  # noqa: E402
from mkdt.pipeline import RUNNERS  # noqa: E402

EDGES = import_graph.graph(ROOT / "src")
STAGE_MODULES = {f"mkdt.stages.{name}" for name in STAGES}
ABOVE_LIBRARY = {
    "mkdt.downstream",
    "mkdt.graph",
    "mkdt.store",
    "mkdt.pipeline",
    "mkdt.cli",
    "mkdt.__main__",
    "mkdt.stages",
    "mkdt.stages.context",
    *STAGE_MODULES,
}
LIBRARY_PACKAGES = ("mkdt.data", "mkdt.nn", "mkdt.train")


def test_there_are_no_import_cycles():
    assert import_graph.cycles(EDGES) == []


def test_every_declared_stage_is_a_module_with_a_runner_in_order():
    assert STAGE_MODULES <= set(EDGES)
    assert list(RUNNERS) == list(STAGES)
    assert all(RUNNERS[name].__module__ == f"mkdt.stages.{name}" for name in STAGES)


def test_no_stage_imports_another_stage():
    for stage in STAGE_MODULES:
        assert not EDGES[stage] & (STAGE_MODULES - {stage}), stage


def test_the_library_imports_nothing_above_it():
    library = [m for m in EDGES if m.startswith(LIBRARY_PACKAGES)]
    assert len(library) > 10, "the library packages exist"
    for module in library:
        assert not EDGES[module] & ABOVE_LIBRARY, (module, EDGES[module] & ABOVE_LIBRARY)


def test_data_nn_and_train_do_not_import_the_config():
    # loops take recipes (dataclasses or Protocols), so the library does not depend on the config
    for module, deps in EDGES.items():
        if module.startswith(LIBRARY_PACKAGES):
            assert not any(d == "mkdt.config" or d.startswith("mkdt.config.") for d in deps), module
