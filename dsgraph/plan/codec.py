"""The plan's JSON form. Dataclasses become objects (a member of a union gets its `kind`), enums
their values, tuples lists. Decoding follows the type annotations, so that the two directions
cannot drift apart, and refuses what does not fit them."""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any


def encode(value: Any, tagged: frozenset[type], skip: frozenset[str] = frozenset()) -> Any:
    """`value` as JSON data; the dataclass fields named in `skip` are left out."""
    cls = type(value)
    if cls in _SCALARS:
        return value
    names = _fields(cls)
    if names is not None:
        out = {"kind": getattr(value, "kind")} if cls in tagged else {}  # noqa: B009
        for name in names:
            if name not in skip:
                out[name] = encode(getattr(value, name), tagged, skip)
        return out
    if isinstance(value, Enum):
        return value.value
    if cls is tuple or cls is list:
        return [encode(v, tagged, skip) for v in value]
    if cls is dict:
        return {k: encode(v, tagged, skip) for k, v in value.items()}
    return value


_SCALARS = frozenset({str, int, float, bool, type(None)})
_FIELDS: dict[type, tuple[str, ...] | None] = {}


def _fields(cls: type) -> tuple[str, ...] | None:
    """The field names of a dataclass, None for any other type (looked up once per type: a
    plan of 1000 models has ~200,000 values)."""
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None
    return _FIELDS[cls]


_HINTS: dict[type, dict[str, Any]] = {}


def decode(tp: Any, value: Any, tagged: frozenset[type]) -> Any:
    """`value` (parsed JSON) as type `tp`; a union of tagged classes is told apart by `kind`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return decode(members[0], value, tagged)
        if all(m in tagged for m in members):  # a step, an op or an expression
            return decode({getattr(m, "kind"): m for m in members}[value["kind"]], value, tagged)  # noqa: B009
        if not any(isinstance(value, m) for m in members if isinstance(m, type)):
            raise TypeError(f"{value!r} is none of {tp}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v, tagged) for v in value)
        return tuple(decode(a, v, tagged) for a, v in zip(args, value, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"expected an object for {tp.__name__}, got {value!r}")
        hints = _HINTS.get(tp)
        if hints is None:
            hints = _HINTS[tp] = typing.get_type_hints(tp)
        return tp(**{f.name: decode(hints[f.name], value[f.name], tagged) for f in dataclasses.fields(tp)})
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise TypeError(f"expected {tp.__name__}, got {value!r}")
    return value
