"""The method vocabulary: parse_method's fields for every name, refused names, and no hand parsing."""

import ast
import re
import sys
from pathlib import Path

import pytest

from mkdt.errors import ConfigError
from mkdt.methods import (
    EVAL_METHODS,
    INIT_METHODS,
    LR_MATCHED,
    METHOD_NAMES,
    OPTIONAL_METHODS,
    VARIANTS,
    external_method,
    is_method,
    method_label,
    method_order,
    parse_method,
    variant_method,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import import_graph  # noqa: E402

SRC = ROOT / "src" / "mkdt"
OWNERS = {SRC / "methods.py", SRC / "analysis" / "mtt.py"}  # mtt.py names its own curves mtt_ssl


@pytest.mark.parametrize(
    "name, kind, subset, step_size, source, external",
    [
        ("no_pretrain", "none", None, None, None, None),
        ("random", "subset", "random", "eval_lr", "init", None),
        ("sas", "subset", "sas", "eval_lr", "init", None),
        ("high_loss", "subset", "high_loss", "eval_lr", "init", None),
        ("full", "full", None, "eval_lr", "data", None),
        ("random@alpha", "subset", "random", "alpha", "init", None),
        ("high_loss@alpha", "subset", "high_loss", "alpha", "init", None),
        ("mkdt", "distilled", None, "alpha", "distill", None),
        ("mkdt_random", "distilled", "random", "own", "variant", None),
        ("mkdt_sas", "distilled", "sas", "own", "variant", None),
        ("mkdt_high_loss", "distilled", "high_loss", "own", "variant", None),
        ("mtt_ssl", "mtt_ssl", None, "own", "mtt", None),
        ("krr_st", "krr_st", None, "eval_lr", "krr_st", None),
        ("ext:krr_st", "external", None, "own", "imported", "krr_st"),
        ("ext:K-1.v2", "external", None, "own", "imported", "K-1.v2"),
    ],
)
def test_a_name_parses_into_its_fields(name, kind, subset, step_size, source, external):
    method = parse_method(name)
    assert (method.name, method.kind, method.subset, method.step_size, method.source, method.external) == (
        name,
        kind,
        subset,
        step_size,
        source,
        external,
    )


def test_every_known_name_parses_with_its_label_and_order():
    names = {*METHOD_NAMES, *EVAL_METHODS, *OPTIONAL_METHODS, *LR_MATCHED, *VARIANTS}
    assert names == set(METHOD_NAMES)
    for name in names:
        assert parse_method(name).name == name and parse_method(name).label == METHOD_NAMES[name]
        assert method_label(name) == METHOD_NAMES[name]
    assert parse_method("ext:krr").label == method_label("ext:krr") == "krr (imported)"
    assert method_label("not a method") == "not a method"
    order = sorted(["ext:b", "full", "ext:a", "mkdt", "no_pretrain"], key=method_order)
    assert order == ["no_pretrain", "mkdt", "full", "ext:a", "ext:b"]


def test_the_builders_make_names_that_parse_back():
    for subset in INIT_METHODS:
        assert parse_method(variant_method(subset)).subset == subset
        assert variant_method(subset) in VARIANTS
    assert parse_method(external_method("krr")).external == "krr"


def test_only_sets_trained_at_a_learned_alpha_syn_have_a_distilled_step():
    learned = {name for name in METHOD_NAMES if parse_method(name).distilled_step}
    assert learned == {"mkdt", *LR_MATCHED, *VARIANTS}
    assert not parse_method("ext:krr").distilled_step


@pytest.mark.parametrize(
    "name",
    ["", "MKDT", "mkdt_", "mkdt_full", "mkdt_mkdt", "sas@alpha", "full@alpha", "random@Alpha", "mtt_sl"]
    + ["ext:", "ext:a/b", "ext:.hidden", "ext: x", "ext:" + "x" * 65, "EXT:krr", "krr"],
)
def test_an_unknown_or_malformed_name_is_refused_naming_the_choices(name):
    with pytest.raises(ConfigError, match=r"unknown method .*: choose from no_pretrain, .*ext:NAME"):
        parse_method(name)
    assert not is_method(name)


# ---------------------------------------------------------------- no parsing by hand

AFFIXES = ("@alpha", "mkdt_", "ext:")
AFFIX_CONSTANTS = {"AT_ALPHA", "VARIANT_PREFIX", "EXTERNAL_PREFIX", "EXTERNAL"}
STRING_METHODS = {"startswith", "endswith", "removeprefix", "removesuffix", "partition", "rpartition"}
STRING_METHODS |= {"split", "rsplit", "replace", "index", "find"}
A_METHOD_NAME = re.compile(r"[a-z_]+@alpha|mkdt_[a-z_]+|ext:[A-Za-z0-9_.-]*")


def _is_affix(node: ast.expr, exact: bool = False) -> bool:
    """A literal holding an affix or mtt_ssl (being one, with ``exact``), or an affix constant."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        words = (*AFFIXES, "mtt_ssl")
        return node.value in words if exact else any(w in node.value for w in words)
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
    return name in AFFIX_CONSTANTS


def _builds_a_name(node: ast.JoinedStr) -> bool:
    """An f-string with an affix right before or after a placeholder (``f"mkdt_{subset}"``)."""
    parts = node.values
    for before, after in zip(parts, parts[1:], strict=False):
        if isinstance(before, ast.Constant) and isinstance(after, ast.FormattedValue):
            if before.value.endswith(("mkdt_", "ext:")):
                return True
        if isinstance(before, ast.FormattedValue) and isinstance(after, ast.Constant):
            if after.value.startswith("@alpha"):
                return True
    return False


def hand_parsing(source: str) -> list[str]:
    """The places of ``source`` that read or build method names without mkdt.methods."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in (*AFFIXES, "mtt_ssl") or A_METHOD_NAME.fullmatch(node.value):
                found.append(f"{where}: literal {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and _builds_a_name(node):
            found.append(f"{where}: a name built in an f-string")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in STRING_METHODS and any(map(_is_affix, node.args)):
                found.append(f"{where}: .{node.func.attr}() with a method affix")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            if _is_affix(node.left, exact=True) or _is_affix(node.right, exact=True):
                found.append(f"{where}: a name built with +")
        elif isinstance(node, ast.ImportFrom) and node.module in ("mkdt.methods", "mkdt.report"):
            if bad := sorted({a.name for a in node.names} & AFFIX_CONSTANTS):
                found.append(f"{where}: imports {', '.join(bad)}")
    return found


def test_the_scan_finds_the_ways_names_were_parsed_by_hand():
    examples = [
        'method == "mtt_ssl"',
        'method in ("full", "mtt_ssl")',
        "m.removesuffix(AT_ALPHA)",
        "m.endswith('@alpha')",
        'name.startswith("ext:")',
        "EXTERNAL + name",
        '"mkdt_" + subset',
        "LR = ('random@alpha',)",
        "from mkdt.report import AT_ALPHA, VARIANTS",
        'f"evaluate it as [..., ext:{name}]"',
        'f"{subset}@alpha"',
    ]
    for example in examples:
        assert hand_parsing(example), example
    prose = 'help = "mkdt, mtt_ssl or ext:NAME" + f" (not {x}: mtt_ssl)"\npath = x.mtt_ssl_path'
    assert hand_parsing(prose) == []


def test_no_module_but_mkdt_methods_parses_method_names():
    found = {
        str(path.relative_to(SRC)): bad
        for path in sorted(SRC.rglob("*.py"))
        if path not in OWNERS and (bad := hand_parsing(path.read_text()))
    }
    assert found == {}


def test_the_vocabulary_is_a_bottom_layer_and_the_config_needs_no_library():
    edges = import_graph.graph(ROOT / "src")
    assert edges["mkdt.methods"] <= {"mkdt.errors"}
    for module, deps in edges.items():
        if module == "mkdt.config" or module.startswith("mkdt.config."):
            below = {d for d in deps if d in ("mkdt.store", "mkdt.results") or d.startswith("mkdt.train")}
            assert not below, (module, below)
