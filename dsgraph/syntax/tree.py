"""Parse tree -> AST: one method per grammar rule (or alias), each building the AST class of
that name, with the span of the text it covers."""

from __future__ import annotations

import builtins
import dataclasses
import re
from typing import Any, TypeAlias

from collections.abc import Callable

from lark import Token, Tree
from lark.tree import Meta

from dsgraph.source import Span
from dsgraph.syntax import ast

Children: TypeAlias = list[Any]  # the rule's children, already built: AST nodes and tokens


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        value = float(text)
        return int(value) if value.is_integer() and "e" in text.lower() and "." not in text else value


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


def _unquote(token: str) -> str:
    """A string's value: `\\"`, `\\\\`, `\\n` and `\\t` are escapes; any other backslash stays."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), token[1:-1])


class ToAst:
    """One method per grammar rule (or alias), each building the AST class of that name.

    A plain bottom-up walk (the tree's depth is bounded by MAX_DEPTH before we get here); it is
    about twice as fast as Lark's Transformer, which matters for pipelines of 1000 models."""

    def __init__(self, filename: str):
        self.filename = filename

    def transform(self, tree: Tree[Token]) -> Any:
        children = [self.transform(c) if isinstance(c, Tree) else c for c in tree.children]
        return getattr(self, tree.data)(tree.meta, children)

    def _span(self, meta: Meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.filename, 1, 1, 1, 2)
        return Span(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, token: Token) -> Span:
        # Tokens from the parser always carry positions (propagate_positions).
        assert token.line is not None and token.column is not None
        assert token.end_line is not None and token.end_column is not None
        return Span(self.filename, token.line, token.column, token.end_line, token.end_column)

    def start(self, meta: Meta, items: Children) -> ast.File:
        return ast.File(tuple(items), self._span(meta))

    def name(self, meta: Meta, children: Children) -> ast.Name:
        (token,) = children
        return ast.Name(str(token), self._tok(token))

    def include(self, meta: Meta, children: Children) -> ast.Include:
        (token,) = children
        return ast.Include(ast.String(_unquote(token), self._tok(token)), self._span(meta))

    def pipeline(self, meta: Meta, children: Children) -> ast.Pipeline:
        name, *items = children
        return ast.Pipeline(name, tuple(items), self._span(meta))

    def setting(self, meta: Meta, children: Children) -> ast.Setting:
        token, value = children
        return ast.Setting(ast.Name(str(token), self._tok(token)), value, self._span(meta))

    def data_decl(self, meta: Meta, children: Children) -> ast.DataDecl:
        name, source, block = children
        return ast.DataDecl(name, source, block, self._span(meta))

    def zero_inline(self, meta: Meta, children: Children) -> ast.ZeroDecl:
        return ast.ZeroDecl(children[0], None, children[1], self._span(meta))

    def zero_file(self, meta: Meta, children: Children) -> ast.ZeroDecl:
        name, file, block = children
        return ast.ZeroDecl(name, file, block, self._span(meta))

    def model_decl(self, meta: Meta, children: Children) -> ast.ModelDecl:
        name, source, block = children
        return ast.ModelDecl(name, source, block, self._span(meta))

    def generate_decl(self, meta: Meta, children: Children) -> ast.GenerateDecl:
        name, model, data, block = children
        return ast.GenerateDecl(name, model, data, block, self._span(meta))

    def reward_decl(self, meta: Meta, children: Children) -> ast.RewardDecl:
        name, source = children
        return ast.RewardDecl(name, source, self._span(meta))

    def loss_decl(self, meta: Meta, children: Children) -> ast.LossDecl:
        return ast.LossDecl(children[0], children[1], self._span(meta))

    def train_stmt(self, meta: Meta, children: Children) -> ast.TrainStmt:
        *models, loss = children
        return ast.TrainStmt(tuple(models), loss, self._span(meta))

    def named_source(self, meta: Meta, children: Children) -> ast.Source:
        path, args = children
        return ast.Source(path, None, args, self._span(meta))

    def factory_source(self, meta: Meta, children: Children) -> ast.Source:
        token, args = children
        return ast.Source((), str(token), args, self._span(meta))

    def dotted_name(self, meta: Meta, children: Children) -> tuple[Any, ...]:
        return tuple(children)

    def args(self, meta: Meta, children: Children) -> tuple[Any, ...]:
        return tuple(c for c in children if c is not None)

    call_args = args

    def positional(self, meta: Meta, children: Children) -> ast.Arg[Any]:
        return ast.Arg(None, children[0], self._span(meta))

    def keyword(self, meta: Meta, children: Children) -> ast.Arg[Any]:
        return ast.Arg(children[0], children[1], self._span(meta))

    def block(self, meta: Meta, children: Children) -> ast.Block:
        return ast.Block(tuple(children), self._span(meta))

    def assign(self, meta: Meta, children: Children) -> ast.Entry:
        return ast.Entry(children[0], children[1], self._span(meta))

    def flag(self, meta: Meta, children: Children) -> ast.Entry:
        return ast.Entry(children[0], None, self._span(meta))

    def number(self, meta: Meta, children: Children) -> ast.Number:
        (token,) = children
        return ast.Number(_number(token), str(token), self._tok(token))

    num = number

    def negative(self, meta: Meta, children: Children) -> ast.Number:
        (token,) = children
        return ast.Number(-_number(token), "-" + str(token), self._span(meta))

    def string(self, meta: Meta, children: Children) -> ast.String:
        (token,) = children
        return ast.String(_unquote(token), self._tok(token))

    str = string

    def true(self, meta: Meta, children: Children) -> ast.Bool:
        return ast.Bool(True, self._span(meta))

    def false(self, meta: Meta, children: Children) -> ast.Bool:
        return ast.Bool(False, self._span(meta))

    def ident(self, meta: Meta, children: Children) -> ast.Ident:
        (token,) = children
        return ast.Ident(str(token), self._tok(token))

    def list(self, meta: Meta, children: Children) -> ast.ListValue:
        return ast.ListValue(tuple(c for c in children if c is not None), self._span(meta))

    def factory_value(self, meta: Meta, children: Children) -> ast.FactoryValue:
        token, args = children
        return ast.FactoryValue(str(token), args, self._span(meta))

    def call_value(self, meta: Meta, children: Children) -> ast.CallValue:
        token, args = children
        return ast.CallValue(ast.Name(str(token), self._tok(token)), args, self._span(meta))

    def ref(self, meta: Meta, children: Children) -> ast.Ref:
        return ast.Ref(children[0], self._span(meta))

    def factory_ref(self, meta: Meta, children: Children) -> ast.FactoryRef:
        (token,) = children
        return ast.FactoryRef(str(token), self._tok(token))

    def attr(self, meta: Meta, children: Children) -> ast.Attr:
        return ast.Attr(children[0], children[1], self._span(meta))

    def call(self, meta: Meta, children: Children) -> ast.Call:
        return ast.Call(children[0], children[1], self._span(meta))

    @staticmethod
    def _binop(op: builtins.str) -> Callable[[ToAst, Meta, Children], ast.BinOp]:
        """The method of one of the four operator rules."""

        def build(self: ToAst, meta: Meta, children: Children) -> ast.BinOp:
            return ast.BinOp(op, children[0], children[1], self._span(meta))

        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    def neg(self, meta: Meta, children: Children) -> ast.Neg:
        return ast.Neg(children[0], self._span(meta))


def shift(node: Any, offset: int) -> Any:
    """A value's AST with its spans moved right by `offset` columns (it was parsed without the
    `key=` prefix of its `--set` argument)."""
    if isinstance(node, tuple):
        return tuple(shift(n, offset) for n in node)
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return node
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, Span):
            changes[f.name] = Span(value.file, value.line, value.col + offset, value.end_line, value.end_col + offset)
        elif dataclasses.is_dataclass(value) or isinstance(value, tuple):
            changes[f.name] = shift(value, offset)
    return dataclasses.replace(node, **changes)
