"""The AST: one frozen dataclass per grammar rule, each carrying its span.

`dump()` prints any node as a deterministic, indented tree (the `--emit ast` form)."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Generic, TypeAlias, TypeVar

from dsgraph.source import Span

V = TypeVar("V")  # what an argument holds: a value or an expression


@dataclass(frozen=True, slots=True)
class Name:
    text: str
    span: Span


# -- values: settings, arguments, block entries ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Number:
    value: int | float
    text: str
    span: Span


@dataclass(frozen=True, slots=True)
class String:
    value: str
    span: Span


@dataclass(frozen=True, slots=True)
class Bool:
    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Ident:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class ListValue:
    items: tuple[Value, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Arg(Generic[V]):
    """`value` or `name = value`, in a call's argument list: values (`Arg[Value]`) in a source or a
    call value, expressions (`Arg[Expr]`) in a call in a loss."""

    name: Name | None
    value: V
    span: Span


@dataclass(frozen=True, slots=True)
class CallValue:
    """`adamw(lr=1e-3)`, `file("zero2.json")`: a named constructor with arguments."""

    name: Name
    args: tuple[Arg[Value], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class FactoryValue:
    """`my.pkg:make(lr=1e-3)` as a value: your own function, called at run time."""

    target: str
    args: tuple[Arg[Value], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Entry:
    """`key = value` in a block, or a bare flag (`frozen`) when `value` is None."""

    key: Name
    value: Value | None
    span: Span


@dataclass(frozen=True, slots=True)
class Block:
    entries: tuple[Entry, ...]
    span: Span


Value: TypeAlias = Number | String | Bool | Ident | ListValue | CallValue | FactoryValue | Block


# -- expressions: loss definitions ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    name: Name
    span: Span


@dataclass(frozen=True, slots=True)
class FactoryRef:
    target: str
    span: Span


@dataclass(frozen=True, slots=True)
class Attr:
    obj: Expr
    name: Name
    span: Span


@dataclass(frozen=True, slots=True)
class Call:
    callee: Expr
    args: tuple[Arg[Expr], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str
    left: Expr
    right: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Expr
    span: Span


Expr: TypeAlias = Number | String | Ref | FactoryRef | Attr | Call | BinOp | Neg


# -- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """`builtin.mlp(...)`, `hf("dir")` (path = dotted name) or `pkg.mod:fn(...)` (factory)."""

    path: tuple[Name, ...]
    factory: str | None
    args: tuple[Arg[Value], ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Setting:
    name: Name
    value: Value
    span: Span


@dataclass(frozen=True, slots=True)
class DataDecl:
    name: Name
    source: Source
    block: Block | None
    span: Span


@dataclass(frozen=True, slots=True)
class ZeroDecl:
    """`zero NAME { ... }` (file is None) or `zero NAME = file("x.json") { ... }`."""

    name: Name
    file: CallValue | None
    block: Block | None
    span: Span


@dataclass(frozen=True, slots=True)
class ModelDecl:
    name: Name
    source: Source
    block: Block | None
    span: Span


@dataclass(frozen=True, slots=True)
class GenerateDecl:
    name: Name
    model: Name
    data: Name
    block: Block | None
    span: Span


@dataclass(frozen=True, slots=True)
class RewardDecl:
    name: Name
    source: Source
    span: Span


@dataclass(frozen=True, slots=True)
class LossDecl:
    name: Name
    expr: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class TrainStmt:
    models: tuple[Name, ...]
    loss: Name
    span: Span


Item: TypeAlias = Setting | DataDecl | ZeroDecl | ModelDecl | GenerateDecl | RewardDecl | LossDecl | TrainStmt


@dataclass(frozen=True, slots=True)
class Include:
    path: String
    span: Span


@dataclass(frozen=True, slots=True)
class Pipeline:
    name: Name
    items: tuple[Item, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class File:
    items: tuple[Include | ZeroDecl | Pipeline, ...]
    span: Span


def dump(node: object, indent: int = 0) -> str:
    """A deterministic, indented rendering of an AST node and its spans."""
    out: list[str] = []
    _dump(node, indent, out, label="")
    return "\n".join(out) + "\n"


def _dump(node: object, indent: int, out: list[str], label: str) -> None:
    pad = "  " * indent
    if isinstance(node, tuple):
        if not node:
            return
        for child in node:
            _dump(child, indent, out, label)
        return
    if node is None or isinstance(node, (str, int, float, bool)):
        if node is not None:
            out.append(f"{pad}{label}{node!r}")
        return
    if isinstance(node, Name):
        out.append(f"{pad}{label}{node.text} @{node.span.line}:{node.span.col}")
        return
    assert is_dataclass(node) and not isinstance(node, type), node
    span: Span = getattr(node, "span")  # noqa: B009 - every AST node has one
    simple = [f for f in fields(node) if f.name != "span"]
    out.append(f"{pad}{label}{type(node).__name__} @{span.line}:{span.col}")
    for f in simple:
        _dump(getattr(node, f.name), indent + 1, out, f"{f.name}: ")
