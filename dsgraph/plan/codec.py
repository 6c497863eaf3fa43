"""The plan's JSON form. Dataclasses become objects (a member of a union gets its `kind`), enums
their values, tuples lists. Decoding follows the type annotations, so that the two directions
cannot drift apart, and refuses what does not fit them."""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from typing import Any


def encode(value: Any, tagged: frozenset[type]) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {"kind": getattr(value, "kind")} if type(value) in tagged else {}  # noqa: B009
        out.update({f.name: encode(getattr(value, f.name), tagged) for f in dataclasses.fields(value)})
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [encode(v, tagged) for v in value]
    if isinstance(value, dict):
        return {k: encode(v, tagged) for k, v in value.items()}
    return value


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


def without_spans(value: Any) -> Any:
    """The JSON form without spans and file names (what the digest covers)."""
    if isinstance(value, dict):
        return {k: without_spans(v) for k, v in value.items() if k not in ("span", "file")}
    if isinstance(value, list):
        return [without_spans(v) for v in value]
    return value
