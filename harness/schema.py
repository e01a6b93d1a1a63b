"""Build frozen config dataclasses from plain mappings (YAML), with errors that name the field.

Every config in ptqbench (sweep sections and each method's options) is a dataclass; this module
turns ``{"alpha": 0.5}`` into ``SmoothQuantConfig(alpha=0.5)`` and back. Unknown keys are errors
with a "did you mean" hint (a typo must never become a silent default). Value checks beyond the
type live in each dataclass's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from harness.errors import ConfigError, did_you_mean

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; use one of {list(args)}")
        return value
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(items))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} is not allowed; use true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} is not allowed; use an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {value!r} is not allowed; use a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} is not allowed; use a string")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """``cls(**data)`` with unknown keys and wrong types reported as one-line ``ConfigError``."""
    prefix = f"{where}." if where else ""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown option{did_you_mean(str(key), list(fields))}; allowed: {', '.join(fields) or 'none'}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        # __post_init__ names its field without the section; add it.
        msg = str(err)
        named = not prefix or msg.startswith((prefix, f"{where}:"))  # the section itself may be the field
        raise ConfigError(msg if named else f"{prefix}{msg}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain JSON/YAML types; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
