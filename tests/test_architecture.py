"""The package's layers, checked on its import graph (read from the source, nothing imported)."""

import ast
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

from mkdt import store  # noqa: E402
from mkdt.graph import STAGES  # noqa: E402
from mkdt.pipeline import RUNNERS  # noqa: E402
from mkdt.store import RunDir  # noqa: E402

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


def _run_dir_vocabulary() -> tuple[set[str], set[str]]:
    """RunDir's members that give a path inside the run directory (``path`` and every property
    or method annotated ``-> Path``), and the run directory's top-level entries: the first part
    of each such property's path, of each ``OUT/...`` entry of store.py's layout, and the stages."""
    members, names = {"path"}, set(STAGES)
    probe = RunDir("/RUN")
    for name, member in vars(RunDir).items():
        function = member.fget if isinstance(member, property) else member
        if callable(function) and typing.get_type_hints(function).get("return") is Path:
            members.add(name)
            if isinstance(member, property):
                names.add(getattr(probe, name).relative_to(probe.path).parts[0])
    names |= set(re.findall(r"OUT/([^/\s<,]+)", store.__doc__ or ""))
    return members, names


def _joined(node: ast.AST) -> list[ast.AST]:
    """The parts that ``node`` joins into a path: ``a / b``, ``a.joinpath(b)``, ``Path(a, b)``,
    ``os.path.join(a, b)``; [] for any other node."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return [node.left, node.right]
    if not isinstance(node, ast.Call):
        return []
    if isinstance(node.func, ast.Attribute) and node.func.attr == "joinpath":
        return [node.func.value, *node.args]
    function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    return list(node.args) if function in ("Path", "join") else []


def _in_run(node: ast.AST, members: set[str]) -> bool:
    """Whether ``node`` is a RunDir path: ``X.member`` or ``X.member(...)``, also through ``.parent``."""
    while isinstance(node, ast.Attribute) and node.attr == "parent":
        node = node.value
    if isinstance(node, ast.Call):
        node = node.func
    return isinstance(node, ast.Attribute) and node.attr in members


def _names_entry(node: ast.AST, names: set[str]) -> bool:
    """Whether ``node`` is a string (or an f-string starting with text) whose first part is in ``names``."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    return isinstance(node, ast.Constant) and str(node.value).split("/")[0] in names


def _run_paths_built(tree: ast.AST, members: set[str], names: set[str]) -> list[int]:
    """The lines of ``tree`` that join something onto a path inside a run directory, or join a
    run directory's top-level entry onto any path (see the test's docstring)."""
    lines = []
    for node in ast.walk(tree):
        parts = _joined(node)
        if len(parts) > 1 and (_in_run(parts[0], members) or any(_names_entry(p, names) for p in parts[1:])):
            lines.append(node.lineno)
    return sorted(lines)


def test_only_the_store_builds_paths_inside_a_run_directory():
    """RunDir (store.py) names every file of a run directory; other code asks it for paths.

    The rule, checked on the syntax of every module but store.py: no path is joined (``a / b``,
    ``a.joinpath(b)``, ``Path(a, b)``, ``os.path.join(a, b)``) onto a RunDir path (``X.path``,
    ``X.<property>`` or ``X.<method>(...)`` of a RunDir member annotated ``-> Path``, also through
    ``.parent``), and no string literal whose first part is a top-level entry of a run directory
    (``config.yaml``, ``results.json``, ``analysis``, a stage's folder, ...: from RunDir's
    properties and store.py's layout) is joined onto any path. Paths built from names RunDir does
    not know, or with string formatting, are not seen.
    """
    members, names = _run_dir_vocabulary()
    package = ROOT / "src" / "mkdt"
    found = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel != "store.py" and (lines := _run_paths_built(ast.parse(path.read_text()), members, names)):
            found[rel] = lines
    assert not found, f"paths inside a run directory built outside RunDir (file: lines): {found}"
