"""Parse tree -> AST: one method per grammar rule (or alias), each building the AST class of
that name, with the span of the text it covers."""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from lark import Token, Tree

from dsgraph.source import Span
from dsgraph.syntax import ast

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

    def transform(self, tree: Tree):
        children = [self.transform(c) if isinstance(c, Tree) else c for c in tree.children]
        return getattr(self, tree.data)(tree.meta, children)

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.filename, 1, 1, 1, 2)
        return Span(self.filename, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok(self, token: Token) -> Span:
        return Span(self.filename, token.line, token.column, token.end_line, token.end_column)

    def start(self, meta, items):
        return ast.File(tuple(items), self._span(meta))

    def name(self, meta, children):
        (token,) = children
        return ast.Name(str(token), self._tok(token))

    def include(self, meta, children):
        (token,) = children
        return ast.Include(ast.String(_unquote(token), self._tok(token)), self._span(meta))

    def pipeline(self, meta, children):
        name, *items = children
        return ast.Pipeline(name, tuple(items), self._span(meta))

    def setting(self, meta, children):
        token, value = children
        return ast.Setting(ast.Name(str(token), self._tok(token)), value, self._span(meta))

    def data_decl(self, meta, children):
        return ast.DataDecl(children[0], children[1], self._span(meta))

    def zero_inline(self, meta, children):
        return ast.ZeroDecl(children[0], None, children[1], self._span(meta))

    def zero_file(self, meta, children):
        name, file, block = children
        return ast.ZeroDecl(name, file, block, self._span(meta))

    def model_decl(self, meta, children):
        name, source, block = children
        return ast.ModelDecl(name, source, block, self._span(meta))

    def loss_decl(self, meta, children):
        return ast.LossDecl(children[0], children[1], self._span(meta))

    def train_stmt(self, meta, children):
        *models, loss = children
        return ast.TrainStmt(tuple(models), loss, self._span(meta))

    def named_source(self, meta, children):
        path, args = children
        return ast.Source(path, None, args, self._span(meta))

    def factory_source(self, meta, children):
        token, args = children
        return ast.Source((), str(token), args, self._span(meta))

    def dotted_name(self, meta, children):
        return tuple(children)

    def args(self, meta, children):
        return tuple(c for c in children if c is not None)

    call_args = args

    def positional(self, meta, children):
        return ast.Arg(None, children[0], self._span(meta))

    def keyword(self, meta, children):
        return ast.Arg(children[0], children[1], self._span(meta))

    def block(self, meta, children):
        return ast.Block(tuple(children), self._span(meta))

    def assign(self, meta, children):
        return ast.Entry(children[0], children[1], self._span(meta))

    def flag(self, meta, children):
        return ast.Entry(children[0], None, self._span(meta))

    def number(self, meta, children):
        (token,) = children
        return ast.Number(_number(token), str(token), self._tok(token))

    num = number

    def negative(self, meta, children):
        (token,) = children
        return ast.Number(-_number(token), "-" + str(token), self._span(meta))

    def string(self, meta, children):
        (token,) = children
        return ast.String(_unquote(token), self._tok(token))

    str = string

    def true(self, meta, children):
        return ast.Bool(True, self._span(meta))

    def false(self, meta, children):
        return ast.Bool(False, self._span(meta))

    def ident(self, meta, children):
        (token,) = children
        return ast.Ident(str(token), self._tok(token))

    def list(self, meta, children):
        return ast.ListValue(tuple(c for c in children if c is not None), self._span(meta))

    def call_value(self, meta, children):
        token, args = children
        return ast.CallValue(ast.Name(str(token), self._tok(token)), args, self._span(meta))

    def ref(self, meta, children):
        return ast.Ref(children[0], self._span(meta))

    def factory_ref(self, meta, children):
        (token,) = children
        return ast.FactoryRef(str(token), self._tok(token))

    def attr(self, meta, children):
        return ast.Attr(children[0], children[1], self._span(meta))

    def call(self, meta, children):
        return ast.Call(children[0], children[1], self._span(meta))

    def _binop(op):
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[1], self._span(meta))
        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    def neg(self, meta, children):
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
