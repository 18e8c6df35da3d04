"""Typed dataclass configs: YAML presets plus ``key=value`` overrides.

A preset file in ``configs/`` holds one section per stage (``data:``, ``pretrain:``, ...). A stage takes only its
own section (``section_for``), so every component sees just its slice. A file given with ``--config`` must have the
stage's section (an empty ``sft:`` takes every default on purpose): a missing one is a ``ConfigError`` naming the
file, the section and the sections it has, never a silent run on the dataclass defaults. The only exceptions are
``OPTIONAL_SECTIONS`` (settings of a command that are not a stage's, e.g. ``plan:``) and a caller's explicit
``required=False``. Unknown keys and wrong types are ``ConfigError``s that name the key and say what to do.

Nested sections are dataclasses too (``train.lr``, ``model.dim``). A section class may name a ``SHORTHAND`` field:
then a plain value stands for that field (``model: demo`` in YAML = ``model: {preset: demo}``), so
``model=demo model.dim=128`` and a preset's ``model: demo`` followed by ``model.dim=128`` both work.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it and what to do."""


def preset_path(name_or_path: str) -> Path:
    """``tiny`` -> ``configs/tiny.yaml``; an existing path is returned as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown preset {name_or_path!r}; known presets: {known} (or pass a path to a YAML file)")
    return candidate


def load_yaml(name_or_path: str) -> dict[str, Any]:
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys to values")
    return data


# sections whose absence means "the defaults": a command's own assumptions that are not a stage's run settings
# (``genloop plan``'s GPU type, MFU and price, usually given as flags). Every stage section is required.
OPTIONAL_SECTIONS: frozenset[str] = frozenset({"plan"})


def section_for(
    data: Mapping[str, Any], stage: str, cls: type, source: str = "the config", required: bool = True
) -> dict[str, Any]:
    """A preset's section for ``stage``; a file that is already a flat config for ``cls`` is used whole.

    An empty section (``stage:`` with nothing under it) is ``{}``: every default, on purpose. A missing section is a
    ``ConfigError`` naming ``source``, the section and the sections the file has, unless ``required`` is False."""
    if stage in data and isinstance(data[stage], dict):
        return dict(data[stage])
    if _is_flat(data, cls):
        return dict(data)
    if stage in data:
        if data[stage] is None:
            return {}
        raise ConfigError(f"{source}: section '{stage}:' must be a mapping of keys to values, got {data[stage]!r}")
    if not required:
        return {}
    raise ConfigError(missing_section_message(data, stage, source))


def _is_flat(data: Mapping[str, Any], cls: type) -> bool:
    """Is ``data`` a whole config for ``cls`` (every key a field of it, a mapping only where the field takes one)?
    A preset holding only another stage's section (``data: {...}`` for a class with a ``data`` path) is not."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    if not data or not set(data) <= names:
        return False
    return all(
        not isinstance(v, Mapping)
        or _dataclass_in(hints[k]) is not None
        or typing.get_origin(hints[k]) is dict
        or hints[k] is Any
        for k, v in data.items()
    )


def missing_section_message(data: Mapping[str, Any], stage: str, source: str) -> str:
    """What a missing ``stage:`` section says: the file, the section, the sections it has, the presets that have one."""
    have = ", ".join(f"{k}:" for k in data) or "none"
    with_it = [q.stem for q in sorted(CONFIG_DIR.glob("*.yaml")) if _has_section(q, stage)]
    presets = f"; presets with one: {', '.join(with_it)}" if with_it else ""
    return (
        f"{source} has no '{stage}:' section (its sections: {have}); add a '{stage}:' section to it (an empty "
        f"'{stage}:' takes every default) or pass a --config that has one{presets}"
    )


def _has_section(path: Path, stage: str) -> bool:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and stage in data


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=3`` -> ``("a.b", 3)``; values are parsed as YAML scalars (numbers, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (example: train.lr=3e-4 or model.dim=128)")
    key, _, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(
    base: dict[str, Any], overrides: list[str] | Mapping[str, Any], cls: type | None = None
) -> dict[str, Any]:
    """``base`` with each ``a.b=value`` set in order; with ``cls``, shorthands are expanded before each one."""
    out = expand_shorthands(cls, _deepcopy_dict(base)) if cls else _deepcopy_dict(base)
    items = overrides.items() if isinstance(overrides, Mapping) else (parse_override(o) for o in overrides)
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        section = _section_at(cls, parts) if cls else None
        short = getattr(section, "SHORTHAND", None)
        if short and isinstance(node.get(parts[-1]), dict) and not isinstance(value, Mapping):
            node[parts[-1]][short] = value  # `model=demo` after `model.dim=128`: sets the preset, keeps dim
        else:
            node[parts[-1]] = value
        if cls:
            out = expand_shorthands(cls, out)
    return out


def expand_shorthands(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Replace a plain value given for a section with a ``SHORTHAND`` field by ``{SHORTHAND: value}``, recursively."""
    if not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = _dataclass_in(hints[f.name])
        if tp is None:
            continue
        value = data[f.name]
        short = getattr(tp, "SHORTHAND", None)
        if short and value is not None and not isinstance(value, Mapping) and not dataclasses.is_dataclass(value):
            data[f.name] = {short: value}
        elif isinstance(value, dict):
            data[f.name] = expand_shorthands(tp, value)
    return data


def _section_at(cls: type, parts: list[str]) -> type | None:
    """The section dataclass at dotted path ``parts`` of ``cls`` (None when the path is no section)."""
    tp: type | None = cls
    for name in parts:
        if tp is None:
            return None
        fields = {f.name for f in dataclasses.fields(tp)}
        tp = _dataclass_in(typing.get_type_hints(tp)[name]) if name in fields else None
    return tp


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass in ``tp`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _deepcopy_dict(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_dict(v) if isinstance(v, Mapping) else v for k, v in d.items()}


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking every key and type (nested dataclasses included)."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hint = _nested_hint(cls, unknown[0], where)
        raise ConfigError(
            f"unknown config key '{where}{unknown[0]}' for {cls.__name__}; known keys: "
            f"{', '.join(sorted(fields))}{hint}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def _nested_hint(cls: type, name: str, where: str) -> str:
    """``; did you mean train.lr?`` when ``name`` is a key of one of ``cls``'s sections."""
    hints = typing.get_type_hints(cls)
    found = [
        f"{where}{f.name}.{name}"
        for f in dataclasses.fields(cls)
        if (tp := _dataclass_in(hints[f.name])) is not None and name in {g.name for g in dataclasses.fields(tp)}
    ]
    return f"; did you mean {' or '.join(found)}?" if found else ""


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        short = getattr(tp, "SHORTHAND", None)
        if short and value is not None and not isinstance(value, (Mapping, list)):
            value = {short: value}
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, key) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    return value


def build_config(
    cls: type[T],
    stage: str,
    config: str | None = None,
    overrides: list[str] | Mapping[str, Any] = (),
    required: bool | None = None,
) -> T:
    """The stage's config: the dataclass defaults, then the preset/YAML section, then overrides.

    With ``config`` the file must have the ``stage:`` section (a ``ConfigError`` otherwise); ``required=False`` (or a
    stage in ``OPTIONAL_SECTIONS``, the default when ``required`` is None) takes the defaults when it is missing.
    Without ``config``: the defaults and the overrides."""
    if not config:
        return from_dict(cls, apply_overrides({}, overrides, cls))
    if required is None:
        required = stage not in OPTIONAL_SECTIONS
    source = str(preset_path(config))
    base = section_for(load_yaml(config), stage, cls, source=source, required=required)
    return from_dict(cls, apply_overrides(base, overrides, cls))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
