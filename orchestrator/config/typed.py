"""Build typed dataclasses from plain dicts, naming the key path in every error.

One small engine serves the experiment config and every method's hyperparameters, so unknown keys,
wrong types and bad literals are reported the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from orchestrator.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping to {_type_name(get_args(tp)[1])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the type annotation ``tp`` and return it converted (ints to floats, dicts to dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(key, f"got {value!r}, allowed values: {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, f"must not be null; expected {_type_name(tp)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(key, f"got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        return [convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = get_args(tp)
        return {convert(k, key_tp, f"{key}.{k}"): convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {key}")


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Instantiate dataclass ``cls`` from ``data``; unknown keys and type errors raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(key, f"expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        raise ConfigError(where, f"unknown key; allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, f"is required ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError as exc:  # __post_init__ checks name keys relative to their own dataclass
        if not key:
            raise
        raise ConfigError(f"{key}.{exc.key}" if exc.key else key, exc.message) from None


def to_dict(obj: Any) -> Any:
    """Plain-data view of a dataclass tree (for YAML/JSON)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def explicit_dict(obj: Any) -> Any:
    """Like :func:`to_dict`, but a dataclass field equal to its default is left out.

    What a config digest hashes: a key added to the schema later, at a default that keeps the old
    behaviour, leaves every existing digest (and the run locations named by one) unchanged.
    """
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING and value == f.default:
                continue
            if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
                continue
            out[f.name] = explicit_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [explicit_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: explicit_dict(v) for k, v in obj.items()}
    return obj


def require(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless ``condition``; used by ``__post_init__`` checks."""
    if not condition:
        raise ConfigError(key, message)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def require_name(value: str, key: str) -> None:
    """Raise ConfigError(key, ...) unless ``value`` is a safe name. Experiment names, method labels,
    evaluation-set names and sweep names each become one segment of a path or object key in the run,
    so each must be exactly one: letters, digits, '.', '_' and '-', starting with a letter or digit
    (never '..', a hidden '.name', a '/' or a hive '=') and at most 100 characters."""
    require(isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None, key,
            f"{value!r} is not a safe name: use 1 to 100 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (it names a directory in the run)")
