"""Configs are dataclasses; this module fills them from YAML and ``key=value`` overrides.

Every field is checked against its type hint at load time, so a mistake fails before any work
starts, naming the key: an unknown key lists the known ones, a ``Literal`` lists the allowed
values, a wrong type says what was expected. Values a type cannot express (ranges, consistency
between fields) are checked by each dataclass's ``__post_init__``; their ``ConfigError`` messages
are prefixed with the section they come from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from kpod.errors import ConfigError

T = TypeVar("T")
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (tuple, list):
        return f"a list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and where harmless converted to) type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"{key}: '{value}' is not allowed; choose one of: {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        item = get_args(tp)[0]
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} settings, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            # YAML 1.1 (PyYAML) reads 1e-3 as a string: only 1.0e-3 is a float there.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` prefixes keys in messages (``train.lr``)."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "moved_keys", {})
    if unknown and unknown[0] in moved:
        raise ConfigError(f"'{prefix}{unknown[0]}' is now '{prefix}{moved[unknown[0]]}'")
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}'; known keys{' in ' + where if where else ''}: "
            + ", ".join(sorted(fields))
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass as plain YAML/JSON data (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def key_data(obj: Any) -> Any:
    """What a pipeline step's key hashes: :func:`to_dict`, except that the fields a dataclass
    names in its ``LATE_FIELDS`` (options added after results were keyed, whose default does what
    ran before they existed) are left out while they hold their default, so that adding an option
    does not make finished steps run again; set to anything else, they are part of the key."""
    if dataclasses.is_dataclass(obj):
        late = getattr(type(obj), "LATE_FIELDS", ())
        return {
            f.name: key_data(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if not (f.name in late and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, list | tuple):
        return [key_data(v) for v in obj]
    if isinstance(obj, dict):
        return {k: key_data(v) for k, v in obj.items()}
    return to_dict(obj)


def late_defaults(cls: type) -> dict[str, Any]:
    """The defaults of ``cls``'s ``LATE_FIELDS``: what a record written before they existed meant."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name: defaults[name] for name in getattr(cls, "LATE_FIELDS", ())}


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation from ``cls``'s docstring section ``Attributes:`` (one entry may
    document several fields: ``lora_r, lora_alpha: text``), joined onto one line."""
    import inspect

    docs: dict[str, str] = {}
    lines = (inspect.getdoc(cls) or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return docs
    entry = re.compile(r"^(\s+)([A-Za-z_][\w, ]*):\s+(.*)$")
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is not None and depth < indent:
            break
        match = entry.match(line)
        if match and (indent is None or depth == indent):
            indent = depth
            names = [n.strip() for n in match.group(2).split(",")]
            for name in names:
                docs[name] = match.group(3).strip()
        elif names:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def _option_type(tp: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse ``type``, ``choices``) of a field's hint; ``null`` reads as None where allowed."""
    origin = get_origin(tp)
    if origin is Literal:
        return str, get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        words = tuple(w for a in inner if get_origin(a) is Literal for w in get_args(a))
        others = [a for a in inner if get_origin(a) is not Literal]
        if words and others:  # a number or a word (``int | Literal["auto"]``): no fixed choices
            plain, _ = _option_type(others[0])

            def base(text: str) -> Any:
                return text if text in words else plain(text)

            base.__name__ = getattr(plain, "__name__", "value")
            choices = None
        else:
            base, choices = _option_type(inner[0])

        def optional(text: str) -> Any:
            return None if text.lower() in ("null", "none") else base(text)

        optional.__name__ = getattr(base, "__name__", "value")
        return optional, choices
    if tp in (int, float, str, Path):
        return tp, None
    return str, None


def add_config_options(
    parser: Any,
    cls: type,
    section: str,
    *,
    skip: tuple[str, ...] = (),
    flags: dict[str, list[str]] | None = None,
    types: dict[str, Any] | None = None,
) -> None:
    """One option per field of config dataclass ``cls``: ``--field-name`` (or the names in
    ``flags[field]``, the first being the main one), with type, choices and help taken from the
    dataclass and its ``Attributes:`` docstring, so the CLI and YAML configs share one source of
    names, defaults and help. Booleans get ``--x``/``--no-x``; ``types[field]`` replaces a field's
    argparse type where a range is better refused by argparse. Options left out keep the
    dataclass's default (:func:`config_from_args`)."""
    import argparse

    hints = get_type_hints(cls)
    docs = field_docs(cls)
    flags = flags or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):  # a sub-section: its fields, flags unprefixed
            sub = hints[f.name]
            add_config_options(parser, sub, f"{section}.{f.name}", skip=skip, flags=flags, types=types)
            continue
        names = flags.get(f.name) or ["--" + f.name.replace("_", "-")]
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        text = docs.get(f.name, "").replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": f"{section}.{f.name}",
            "default": argparse.SUPPRESS,  # not given: absent, so an explicit null can still be told apart
            "help": f"{text} (default {shown}; {section}.{f.name} in a config)".strip(),
        }
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"], choices = _option_type(hints[f.name])
            kwargs["type"] = (types or {}).get(f.name, kwargs["type"])
            if choices:
                kwargs["choices"] = choices
            kwargs["metavar"] = f.name.upper() if not choices else None
        parser.add_argument(*names, **kwargs)


def config_from_args(cls: type[T], args: Any, section: str, data: dict[str, Any] | None = None) -> T:
    """``cls`` from ``data`` (a config section, e.g. after ``--set``) with the options of
    :func:`add_config_options` that were given on top; validated like a YAML config."""
    return from_dict(cls, _given_values(cls, args, section, data), section)


def _given_values(cls: type, args: Any, section: str, data: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with the options given on the command line on top (sub-sections recursively)."""
    values = dict(data or {})
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            sub = values.get(f.name)
            nested = _given_values(hints[f.name], args, key, sub if isinstance(sub, dict) else None)
            if nested or sub is not None:
                values[f.name] = nested if isinstance(sub, dict) or sub is None else sub
        elif hasattr(args, key):  # given on the command line (``null`` included)
            values[f.name] = getattr(args, key)
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=2e-4`` -> (["train", "lr"], 0.0002); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. train.epochs=4")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set nested keys of a config mapping from ``key=value`` strings (a new mapping)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, with the line of a syntax error in the message."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """``cls`` from a YAML file (or defaults) plus ``key=value`` overrides; errors name the file."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


__all__ = [
    "add_config_options",
    "apply_overrides",
    "config_from_args",
    "field_docs",
    "from_dict",
    "load_config",
    "read_yaml",
    "to_dict",
]
