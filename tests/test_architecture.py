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

SRC = ROOT / "src"
EDGES = import_graph.graph(SRC)
LAYERS: list[list[str]] = [
    ["__init__.py", "errors.py"],
    ["files.py", "methods.py", "runtime.py"],
    ["data/", "nn/", "results.py"],
    ["config/", "train/"],
    ["graph.py", "store.py"],
    ["downstream.py", "reporting/"],
    ["analysis/", "stages/"],
    ["external/", "pipeline.py"],
    ["cli.py"],
    ["__main__.py"],
]
"""docs/architecture.md's picture, bottom to top: each layer's units (:func:`import_graph.unit_of`:
a subpackage of src/mkdt with everything in it, ``name/``; a top-level module, ``name.py``; the
package's ``__init__.py``)."""
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
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


def test_every_module_belongs_to_exactly_one_layer():
    placed = [unit for layer in LAYERS for unit in layer]
    assert len(placed) == len(set(placed)), "a unit listed twice in LAYERS"
    units = {import_graph.unit_of(module, SRC) for module in EDGES}
    unplaced, stale = units - set(placed), set(placed) - units
    assert not unplaced, f"place these in LAYERS (and in docs/architecture.md's picture): {unplaced}"
    assert not stale, f"LAYERS lists units that do not exist: {stale}"


def test_every_import_points_down_the_layers():
    """The rule of docs/architecture.md's picture: a module imports only modules of its own unit
    (its subpackage; the imports inside one are acyclic, test_there_are_no_import_cycles) or of
    units in strictly lower layers of LAYERS. Units side by side in a layer import nothing of each other."""
    wrong = []
    for module, deps in EDGES.items():
        unit = import_graph.unit_of(module, SRC)
        for dep in sorted(deps):
            other = import_graph.unit_of(dep, SRC)
            if other != unit and LAYER_OF[other] >= LAYER_OF[unit]:
                wrong.append(f"{module} ({unit}, {LAYER_OF[unit]}) -> {dep} ({other}, {LAYER_OF[other]})")
    assert not wrong, "imports that do not point down LAYERS (unit, layer):\n" + "\n".join(wrong)


def test_the_picture_has_the_layers_the_graph_needs_and_the_doc_draws_them():
    """As many layers as the longest chain of unit imports (``package layers`` of
    ``python tools/import_graph.py``), and docs/architecture.md's picture says so and draws each
    layer's units on the line of its number (and the lines under it, up to the next number)."""
    needed = import_graph.layers(import_graph.unit_graph(EDGES, SRC))
    assert len(LAYERS) == len(needed), needed
    doc = (ROOT / "docs" / "architecture.md").read_text()
    assert f"{len(LAYERS)} layers" in doc
    picture = doc.split("```\n")[1]
    drawn: dict[int, str] = {}
    number = None
    for line in picture.splitlines():
        if match := re.match(r"\s*(\d+)\s", line):
            number = int(match[1])
        if number is not None:
            drawn[number] = drawn.get(number, "") + line + "\n"
    for i, layer in enumerate(LAYERS):
        missing = [unit for unit in layer if unit not in drawn.get(i, "")]
        assert not missing, f"docs/architecture.md does not draw {missing} in layer {i}"


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
