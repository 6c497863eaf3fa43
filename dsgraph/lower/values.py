"""AST values -> plain Python values (int, float, str, bool, list, dict), checked against a type."""

from __future__ import annotations

from typing import Any

from dsgraph.catalogue import REQUIRED, TYPE_WORDS, Builtin, type_matches
from collections.abc import Iterable, Iterator

from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.source import Span
from dsgraph.syntax import ast

INVALID = object()  # a value already reported; callers skip it


def to_python(value: ast.Value, diags: Diagnostics) -> Any:
    match value:
        case ast.Number(value=v) | ast.String(value=v) | ast.Bool(value=v):
            return v
        case ast.Ident(name=n):
            return n
        case ast.ListValue(items=items):
            converted = [to_python(v, diags) for v in items]
            return INVALID if any(v is INVALID for v in converted) else converted
        case ast.Block(entries=entries):
            out: dict[str, Any] = {}
            for entry in entries:
                out[entry.key.text] = True if entry.value is None else to_python(entry.value, diags)
            return INVALID if INVALID in out.values() else out
        case ast.CallValue(span=span) | ast.FactoryValue(span=span):
            called = value.name.text if isinstance(value, ast.CallValue) else value.target
            diags.add(
                "DSG203",
                span,
                f"`{called}(...)` cannot be used as a value here",
                "write a number, a string, a name, a list `[...]` or a block `{...}`",
            )
            return INVALID
    raise TypeError(f"not a value: {value!r}")


def block_entries(
    block: ast.Block | None, known: Iterable[str], what: str, owner: str, diags: Diagnostics
) -> Iterator[ast.Entry]:
    """The entries of a model's or data set's block whose key is one of `known` and given for the
    first time; the others are reported (DSG207 unknown, DSG208 given twice) and left out.
    `what`: "model" or "data set"; `owner`: "model `student`"."""
    known = tuple(known)
    seen: dict[str, Span] = {}
    for entry in block.entries if block else ():
        key = entry.key.text
        if key not in known:
            diags.add(
                "DSG207",
                entry.key.span,
                f"`{key}` is not a {what} property{did_you_mean(key, known)}",
                f"a {what.split()[0]} block takes: {', '.join(known)}",
            )
        elif key in seen:
            diags.add(
                "DSG208",
                entry.key.span,
                f"`{key}` is given twice for {owner}",
                "keep one of them",
                Note("first given here", seen[key]),
            )
        else:
            seen[key] = entry.span
            yield entry


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "a list"
    return "a block"


def check_type(kind: str, value: Any, span: Span, what: str, diags: Diagnostics) -> bool:
    if type_matches(kind, value):
        return True
    diags.add(
        "DSG203", span, f"{what} must be {TYPE_WORDS[kind]}, not {describe(value)}", f"write {TYPE_WORDS[kind]} here"
    )
    return False


def bind_args(
    spec: Builtin, kind: str, args: tuple[ast.Arg[ast.Value], ...], span: Span, diags: Diagnostics
) -> dict[str, Any] | None:
    """Match a call's arguments to a built-in's parameters: unknown, missing and mistyped ones
    are reported; defaults are filled. Returns None when anything was wrong."""
    bound: dict[str, Any] = {}
    ok = True
    for i, arg in enumerate(args):
        if arg.name is None:
            if i >= len(spec.params):
                diags.add(
                    "DSG204",
                    arg.span,
                    f"{kind} `{spec.name}` takes {len(spec.params)} positional argument(s), this is argument {i + 1}",
                    "name the argument: `name = value`",
                )
                ok = False
                continue
            name, name_span = spec.params[i].name, arg.span
        else:
            name, name_span = arg.name.text, arg.name.span
        param = spec.param(name)
        if param is None:
            diags.add(
                "DSG204",
                name_span,
                f"{kind} `{spec.name}` has no argument `{name}`{did_you_mean(name, [p.name for p in spec.params])}",
                f"it takes: {', '.join(p.name for p in spec.params) or 'no arguments'}",
            )
            ok = False
            continue
        if name in bound:
            diags.add("DSG208", name_span, f"argument `{name}` is given twice", "keep one of them")
            ok = False
            continue
        value = to_python(arg.value, diags)
        if value is INVALID or not check_type(
            param.type, value, arg.value.span, f"argument `{name}` of `{spec.name}`", diags
        ):
            ok = False
            bound[name] = INVALID  # given, though wrong: not also "missing"
            continue
        bound[name] = value
    for param in spec.params:
        if param.name not in bound:
            if param.default is REQUIRED:
                diags.add(
                    "DSG205",
                    span,
                    f"{kind} `{spec.name}` needs the argument `{param.name}`",
                    f"add `{param.name} = ...` ({TYPE_WORDS[param.type]})",
                )
                ok = False
            else:
                bound[param.name] = param.default
    return bound if ok else None
