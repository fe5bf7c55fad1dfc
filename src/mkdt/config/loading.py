"""Loading a config: defaults <- preset <- YAML file <- ``key=value`` overrides, then typed and
validated.

A preset (``mkdt/config/presets/NAME.yaml``) holds only what differs from the defaults, its first
comment line says what it is. Unknown keys (with a did-you-mean hint, and where a key moved, its new
name) and values of the wrong type raise :class:`ConfigError` before any compute starts.
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
    return (resources.files("mkdt.config") / "presets" / f"{name}.yaml").read_text()


def load_config(
    preset: str | None = None, config_file: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Defaults <- preset <- YAML file <- ``key=value`` overrides, typed and validated."""
    merged = dataclasses.asdict(Config())
    if preset:
        _merge(merged, _parse_yaml(_preset_text(preset), f"preset {preset}"), "")
    if config_file:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file not found: {config_file}")
        _merge(merged, _parse_yaml(path.read_text(), str(path)), "")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. experts.lr=0.05)")
        _merge(merged, _nest(key.strip(), yaml.safe_load(value) if value else None), "")
    return config_from_dict(merged).validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a typed Config from a nested dict; unknown keys and wrong types raise ConfigError."""
    return _build(Config, data, "")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config (or section) as nested plain dicts."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The config as YAML, keys in declaration order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _parse_yaml(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of config keys")
    return data


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _merge(base: dict[str, Any], update: dict[str, Any], prefix: str) -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(_unknown(prefix + str(key), base.keys(), prefix))
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


def _scalar(tp: type, value: Any, key: str) -> Any:
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "false", "1", "0", "yes", "no"):
                return str(value).lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"config key {key} must be a finite number, got {value!r}")
            return number
        if tp is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"config key {key} must be {tp.__name__}, got {value!r}")


def iter_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field of a config dataclass instance."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, value, f.metadata.get("help", "")
