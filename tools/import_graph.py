"""The import graph of the ``mkdt`` package, read from the source with ``ast`` (nothing is imported).

    python tools/import_graph.py [SRC_DIR] [--edges]

prints the number of modules, import edges (module -> module inside the package, every import
statement counted once per pair, function-level imports included), import cycles, and two
layerings: the modules' layers (layer 0 holds the modules that import no other mkdt module, layer k
those whose imports all lie in layers < k; the modules of a cycle count as one) and the package
layers, the same on the units of docs/architecture.md's picture (:func:`unit_of`: a subpackage with
everything in it counts as one unit). ``tests/test_architecture.py`` uses :func:`graph` and
:func:`unit_of` to hold the architecture's rules and its ``LAYERS``, whose length is the number of
package layers printed here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, src: Path) -> str:
    """``src/mkdt/train/kd.py`` -> ``mkdt.train.kd``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def graph(src: Path, package: str = "mkdt") -> dict[str, set[str]]:
    """{module: the package's modules it imports}; ``from mkdt.x import y`` counts as an import
    of ``mkdt.x.y`` when that is a module, else of ``mkdt.x``. Imports of a package's own
    ``__init__`` re-exports are resolved to the package module."""
    files = sorted((src / package).rglob("*.py"))
    modules = {module_name(f, src): f for f in files}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith(package):
                    edges[name].add(target)
    return edges


def unit_of(module: str, src: Path) -> str:
    """The unit of the package's picture that ``module`` belongs to: ``data/`` for ``mkdt.data``
    and everything in that subpackage (``mkdt.data.formats.cifar`` too), ``cli.py`` for the
    top-level module ``mkdt.cli``, ``__init__.py`` for the package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__.py"
    return f"{parts[1]}/" if (src / parts[0] / parts[1]).is_dir() else f"{parts[1]}.py"


def unit_graph(edges: dict[str, set[str]], src: Path) -> dict[str, set[str]]:
    """{unit: the other units its modules import} (:func:`unit_of`); imports inside a unit are left out."""
    units: dict[str, set[str]] = {}
    for module, deps in edges.items():
        unit = unit_of(module, src)
        units.setdefault(unit, set()).update(unit_of(d, src) for d in deps)
        units[unit].discard(unit)
    return units


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layers(edges: dict[str, set[str]]) -> list[list[str]]:
    """Modules by layer (see the module docstring); the modules of a cycle share one layer."""
    group = {m: m for m in edges}
    for cycle in cycles(edges):
        for m in cycle:
            group[m] = cycle[0]
    condensed: dict[str, set[str]] = {}
    for m, deps in edges.items():
        condensed.setdefault(group[m], set()).update(group[d] for d in deps if group[d] != group[m])
    placed: dict[str, int] = {}
    remaining = set(condensed)
    result: list[list[str]] = []
    while True:
        layer = sorted(m for m in remaining if all(d in placed for d in condensed[m]))
        if not layer:
            return result
        for m in layer:
            placed[m] = len(result)
        remaining -= set(layer)
        result.append(sorted(m for m in edges if group[m] in layer))


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    src = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "src"
    edges = graph(src)
    lines = {
        m: len((src / (m.replace(".", "/") + ".py")).read_text().splitlines())
        if (src / (m.replace(".", "/") + ".py")).is_file()
        else len((src / m.replace(".", "/") / "__init__.py").read_text().splitlines())
        for m in edges
    }
    found = cycles(edges)
    stacked = layers(edges)
    packages = layers(unit_graph(edges, src))
    print(
        f"modules: {len(edges)}  edges: {sum(map(len, edges.values()))}  cycles: {len(found)}  "
        f"layers: {len(stacked)}  package layers: {len(packages)}  lines: {sum(lines.values())} "
        f"(largest module {max(lines.values())})"
    )
    for cycle in found:
        print("cycle:", " <-> ".join(cycle))
    for i, layer in enumerate(stacked):
        print(f"layer {i}: " + ", ".join(f"{m.removeprefix('mkdt.') or 'mkdt'} ({lines[m]})" for m in layer))
    for i, units in enumerate(packages):
        print(f"package layer {i}: " + ", ".join(units))
    if "--edges" in argv:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
