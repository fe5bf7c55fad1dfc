"""YAML of presets, --config files and overrides: keys twice, binary files, deep nesting, repeated entries."""

import pytest
import yaml

from mkdt.config import load_config, loading
from mkdt.errors import ConfigError


def _file(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("seed: 1\nseed: 2\n", "'seed'", "lines 1 and 2"),
        ("experts:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "'lr'", "lines 2 and 4"),
        ("evaluate: {seeds: 1, seeds: 2}\n", "'seeds'", "lines 1 and 1"),
        ("experts:\n  lr: 0.1\nteacher: {}\nexperts:\n  epochs: 2\n", "'experts'", "lines 1 and 4"),
    ],
)
def test_a_key_given_twice_is_refused_naming_the_key_and_lines(tmp_path, text, key, lines):
    with pytest.raises(ConfigError) as err:
        load_config("demo", _file(tmp_path, text))
    assert f"key {key} is given twice ({lines})" in str(err.value) and "\n" not in str(err.value)


def test_a_key_given_twice_in_a_preset_or_an_override_is_refused(monkeypatch):
    monkeypatch.setattr(loading, "_preset_text", lambda name: "# a preset\nseed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"preset demo: key 'seed' is given twice \(lines 2 and 3\)"):
        load_config("demo")
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="override experts: key 'lr' is given twice"):
        load_config("demo", None, ["experts={lr: 0.1, lr: 0.2}"])


def test_distinct_keys_and_merge_keys_load_as_before(tmp_path):
    text = "experts:\n  lr: 0.05\n  epochs: 6\nteacher:\n  epochs: 2\n"
    config = load_config("demo", _file(tmp_path, text))
    assert (config.experts.lr, config.experts.epochs, config.teacher.epochs) == (0.05, 6, 2)
    merged = yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", Loader=loading.UniqueKeyLoader)
    assert merged["b"] == {"x": 3, "y": 2}  # a key merged in with << may be overridden


def test_a_binary_config_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config("demo", _file(tmp_path, bytes(range(256))))


@pytest.mark.parametrize(
    "text", ["a: " + "[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(3000))]
)
def test_yaml_nested_too_deeply_is_refused_in_one_line(tmp_path, text):
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config("demo", _file(tmp_path, text))
    with pytest.raises(ConfigError, match="override seed is nested too deeply"):
        load_config("demo", None, ["seed=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize(
    "override, message",
    [
        ("evaluate.methods=[mkdt,random,mkdt]", "evaluate.methods: 'mkdt' is listed twice"),
        ("evaluate.label_fractions=[0.01,0.05,0.01]", "evaluate.label_fractions: 0.01 is listed twice"),
        ("evaluate.tasks=[digits,digits]", "evaluate.tasks: 'digits' is listed twice"),
        ("evaluate.protocols=[probe,finetune,probe]", "evaluate.protocols: 'probe' is listed twice"),
        ("distill.variants=[random,random]", "distill.variants: 'random' is listed twice"),
        ("distill.snapshots=[2,2]", "distill.snapshots: 2 is listed twice"),
    ],
)
def test_a_list_entry_given_twice_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", None, [override, "distill.iterations=10"])
