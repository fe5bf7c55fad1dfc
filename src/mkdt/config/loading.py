"""Loading a config: defaults <- preset <- YAML file <- ``key=value`` overrides, then typed and
validated.

A preset (``mkdt/config/presets/NAME.yaml``) holds only what differs from the defaults, its first
comment line says what it is. A preset may build on another with a top-level ``base: OTHER``: OTHER
(and its own bases) is merged first, then the preset over it; an unknown base or a cycle of bases
raises :class:`ConfigError`. Unknown keys (with a did-you-mean hint, and where a key moved, its new
name), a key given twice in one mapping of a YAML file or override (naming the key and its lines),
a file that is not UTF-8 text, YAML nested too deeply to parse and values of the wrong type raise
:class:`ConfigError` before any compute starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mkdt.config.schema import Config
from mkdt.errors import ConfigError

MOVED_KEYS = {"distill.images": "init.images"}


def preset_names() -> list[str]:
    """Names of the presets shipped with mkdt."""
    folder = resources.files("mkdt.config") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """First comment line of a preset file."""
    text = _preset_text(name)
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").strip()


def _preset_text(name: str) -> str:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(preset_names())}")
    return (resources.files("mkdt.config") / "presets" / f"{name}.yaml").read_text(encoding="utf-8")


def _preset_layers(name: str, chain: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The settings of preset ``name`` and of its bases (``base: OTHER``), the deepest base first;
    ``chain`` holds the presets that named ``name`` as their base."""
    if name in chain:
        raise ConfigError(f"presets name each other as base: {' -> '.join((*chain, name))}")
    if chain and name not in preset_names():
        raise ConfigError(
            f"preset {chain[-1]!r} has unknown base {name!r}; available: {', '.join(preset_names())}"
        )
    layer = _parse_yaml(_preset_text(name), f"preset {name}")
    base = layer.pop("base", None)
    if base is None:
        return [layer]
    if not isinstance(base, str):
        raise ConfigError(f"preset {name}: base must be a preset name, got {base!r}")
    return [*_preset_layers(base, (*chain, name)), layer]


def load_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- preset <- YAML file <- ``key=value`` overrides, typed and validated."""
    merged = _unresolved(dataclasses.asdict(Config()))
    for layer in _preset_layers(preset) if preset else ():
        _merge(merged, layer, "")
    if config_file:
        _merge(merged, _parse_yaml(_read_config_file(config_file), config_file), "")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. experts.lr=0.05)")
        _merge(
            merged,
            _nest(key.strip(), _load_yaml(value, f"the value of override {key.strip()}") if value else None),
            "",
        )
    return config_from_dict(merged).validate()


def _read_config_file(name: str) -> str:
    """The text of the ``--config`` file ``name``; ConfigError when it is missing, unreadable or
    not UTF-8 text."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file not found: {name}")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {name} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {name} is not UTF-8 text (byte {exc.start}); give a YAML file of config keys"
        ) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a typed Config from a nested dict; unknown keys and wrong types raise ConfigError."""
    return _build(Config, data, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as nested plain dicts."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The config as YAML, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML text gives one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping that gives a key twice raises
    :class:`DuplicateKeyError` naming the key and both lines (plain YAML keeps the last value
    silently). Keys merged in with ``<<`` may still be overridden."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: the safe loader refuses it below
                    continue
                if first is not None:
                    raise DuplicateKeyError(
                        f"key {key!r} is given twice (lines {first} and {line}); keep one"
                    )
                lines[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, where: str) -> Any:
    """The value of a YAML text (:class:`UniqueKeyLoader`); ConfigError naming ``where`` when it
    is not valid YAML, gives a key twice or is nested too deeply to parse."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: builds plain values only
    except DuplicateKeyError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(
            f"{where} is nested too deeply to read; config keys are a few levels deep"
        ) from None


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    data = _load_yaml(text, where) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of config keys")
    return data


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _unresolved(defaults: dict[str, Any]) -> dict[str, Any]:
    """Default config values with every model section's width back at 0 (the architecture's own
    width, resolved when the section is built), so that changing only ``arch`` (e.g.
    ``experts.student.arch=resnet10``) gives that architecture's width, not the old one's."""
    for value in defaults.values():
        if isinstance(value, dict):
            _unresolved(value)
    if "arch" in defaults and "width" in defaults:
        defaults["width"] = 0
    return defaults


def _section_defaults(dotted: str) -> dict[str, Any] | None:
    """The default values of the config section at ``dotted`` when it is a section that may be
    null (e.g. ``evaluate.model``), else None."""
    tp: Any = Config
    for part in dotted.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if typing.get_origin(tp) in (types.UnionType, typing.Union):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _unresolved(dataclasses.asdict(tp()))
    return None


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(_unknown(prefix + str(key), base.keys(), prefix))
        if base[key] is None and isinstance(value, dict):
            base[key] = _section_defaults(prefix + str(key)) or {}
        if isinstance(base[key], dict) and isinstance(value, dict):
            _merge(base[key], value, f"{prefix}{key}.")
        else:
            base[key] = value


def _unknown(key: str, known: Any, prefix: str) -> str:
    if key in MOVED_KEYS:
        return f"config key {key!r} is now {MOVED_KEYS[key]!r}; rename it"
    close = difflib.get_close_matches(key, [prefix + k for k in known], n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(known)}"
    return f"unknown config key {key!r}{hint}"


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], prefix + f.name)
    unknown = set(data) - set(kwargs)
    if unknown:
        raise ConfigError(
            _unknown(prefix + sorted(unknown)[0], [f.name for f in dataclasses.fields(cls)], prefix)
        )
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} must be a mapping")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key} must be a list, e.g. [0, 1, 2]")
        return [_coerce(args[0], v, key) for v in value]
    return _scalar(tp, value, key)


def _to_bool(value: Any) -> bool:
    """A YAML bool, or true/false, 1/0, yes/no in any case; ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
        return str(value).lower() in ("true", "1", "yes")
    raise ValueError(value)


def _to_int(value: Any) -> int:
    """An integer (a float only when whole; never a bool); ValueError otherwise."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return int(value)


def _to_float(value: Any) -> float:
    """A number (never a bool), possibly not finite; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    return float(value)


def _to_str(value: Any) -> str:
    """Any scalar's text (not null, a mapping or a list); ValueError otherwise."""
    if value is None or isinstance(value, (dict, list)):
        raise ValueError(value)
    return str(value)


SCALARS: dict[type, typing.Callable[[Any], Any]] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
}


def _scalar(tp: type, value: Any, key: str) -> Any:
    """``value`` as the scalar type ``tp`` of config key ``key`` (:data:`SCALARS`; a float must be
    finite); ConfigError naming the key and the value otherwise."""
    try:
        result = SCALARS[tp](value)
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"config key {key} must be {tp.__name__}, got {value!r}") from None
    if tp is float and not math.isfinite(result):
        raise ConfigError(f"config key {key} must be a finite number, got {value!r}")
    return result


def iter_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field of a config dataclass instance."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, f.metadata.get("help", "")
