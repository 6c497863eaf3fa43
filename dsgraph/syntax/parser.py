"""Text -> AST. Lark's errors are translated into DSG1xx diagnostics in plain words."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from dsgraph.diagnostics import Diagnostics
from dsgraph.source import SourceFile, Span
from dsgraph.syntax import ast

MAX_BYTES = 1_000_000       # a .dsg file beyond this is not a pipeline description
MAX_DEPTH = 200             # nesting of brackets and of expression trees

_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string",
    "FACTORY": "a factory `package.module:function`", "$END": "the end of the file",
}


def grammar_path() -> Path:
    """The grammar ships inside the package in a wheel, and at the top level in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "grammars" / "dsgraph.lark", here.parent / "grammars" / "dsgraph.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("grammars/dsgraph.lark is missing from the dsgraph installation")


@lru_cache(maxsize=1)
def _parser() -> Lark:
    options = dict(parser="lalr", propagate_positions=True, maybe_placeholders=True)
    text = grammar_path().read_text(encoding="utf-8")
    try:  # Lark stores the LALR tables in a temp file keyed by the grammar's hash.
        return Lark(text, cache=True, **options)
    except OSError:
        return Lark(text, **options)


def parse(source: SourceFile, diags: Diagnostics) -> ast.File | None:
    """Parse one file. On a syntax error, adds one DSG1xx diagnostic and returns None."""
    if len(source.text) > MAX_BYTES:
        diags.add("DSG105", source.whole(), f"the file is {len(source.text)} characters long",
                  f"a .dsg file may hold at most {MAX_BYTES} characters; split it with `include`")
        return None
    deep = _too_deep(source.text)
    if deep is not None:
        diags.add("DSG105", source.span_at(deep), f"brackets nest deeper than {MAX_DEPTH} levels",
                  "flatten the expression or the block")
        return None
    try:
        tree = _parser().parse(source.text)
    except UnexpectedInput as error:
        _report_syntax_error(error, source, diags)
        return None
    deep = _too_deep_tree(tree)
    if deep is not None:
        span = Span(source.name, *deep, deep[0], deep[1] + 1) if deep != (0, 0) else source.whole()
        diags.add("DSG105", span, f"an expression nests deeper than {MAX_DEPTH} levels",
                  "split the loss into several `loss` declarations that refer to each other")
        return None
    return _ToAst(source.name).transform(tree)


def _too_deep(text: str) -> int | None:
    depth = 0
    for offset, char in _brackets(text):
        if char in "([{":
            depth += 1
            if depth > MAX_DEPTH:
                return offset
        elif char in ")]}":
            depth -= 1
    return None


def _too_deep_tree(tree: Tree) -> tuple[int, int] | None:
    """None when no node of the parse tree is deeper than MAX_DEPTH; else the first
    (line, column) of those nodes, or (0, 0) when none of them has a position."""
    deep, stack = [], [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH and not getattr(node.meta, "empty", True):
            deep.append((node.meta.line, node.meta.column))
        elif depth > MAX_DEPTH:
            deep.append((0, 0))
        stack.extend((c, depth + 1) for c in node.children if isinstance(c, Tree))
    placed = [d for d in deep if d != (0, 0)]
    return min(placed) if placed else ((0, 0) if deep else None)


# -- syntax errors in plain words ------------------------------------------------------------

def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"`{pattern.value}`" if isinstance(pattern, PatternStr) else name.lower()


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    if token.type in ("NAME", "NUMBER", "STRING", "FACTORY"):
        return f"{_TERMINAL_WORDS[token.type].split(' ')[1]} `{token.value}`"
    return f"`{token.value}`"


_VALUE_STARTS = {"NAME", "NUMBER", "STRING", "LSQB", "LBRACE", "TRUE", "FALSE", "MINUS"}
_EXPR_STARTS = {"NAME", "NUMBER", "STRING", "LPAR", "MINUS", "FACTORY"}


def _expected_words(expected: set[str]) -> str:
    expected = {e for e in expected if not (e.startswith("KW_") and "NAME" in expected)}
    if {"NUMBER", "LSQB"} <= expected:
        expected = (expected - _VALUE_STARTS) | {"a value"}
    elif {"NUMBER", "LPAR"} <= expected:
        expected = (expected - _EXPR_STARTS) | {"an expression"}
    words = sorted({e if e.startswith("a") and " " in e else _describe_terminal(e)
                    for e in expected if not e.startswith("KW_") or e == "KW_ON"})
    keywords = sorted(e for e in expected if e.startswith("KW_") and e != "KW_ON")
    if keywords and "a name" not in words:
        words.append("a declaration (" + ", ".join(_describe_terminal(k) for k in keywords) + ")")
    if len(words) > 6:
        words = words[:6] + ["..."]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _report_syntax_error(error: UnexpectedInput, source: SourceFile, diags: Diagnostics) -> None:
    if isinstance(error, UnexpectedCharacters):
        span = Span(source.name, error.line, error.column, error.line, error.column + 1)
        char = source.text[error.pos_in_stream] if error.pos_in_stream < len(source.text) else ""
        if char == '"':
            diags.add("DSG104", span, "this string has no closing quote on its line",
                      'close the string with `"`; strings cannot span lines')
        else:
            diags.add("DSG102", span, f"unexpected character `{char}`",
                      "remove it; comments start with `#`")
        return
    token = getattr(error, "token", None)
    if isinstance(error, UnexpectedEOF) or (isinstance(token, Token) and token.type == "$END"):
        _report_unexpected_end(source, diags)
        return
    assert isinstance(error, UnexpectedToken)
    span = Span(source.name, token.line, token.column, token.end_line or token.line,
                token.end_column or token.column + len(token.value))
    try:  # the exact set of tokens the parser could take here; error.expected over-approximates
        accepted = set(error.interactive_parser.accepts())
    except Exception:  # noqa: BLE001 - fall back to Lark's LALR estimate
        accepted = set(error.expected)
    expected = _expected_words(accepted or set(error.expected))
    diags.add("DSG101", span, f"unexpected {_describe_token(token)}; expected {expected}",
              _hint(token, accepted, _in_zero_header(error)))


def _in_zero_header(error: UnexpectedToken) -> bool:
    """Whether the parser stopped right after `zero NAME` or `zero NAME =`."""
    try:
        stack = error.interactive_parser.parser_state.value_stack
    except AttributeError:
        return False
    kinds = [v.type if isinstance(v, Token) else getattr(v, "data", None) for v in stack[-3:]]
    return kinds[-2:] == ["KW_ZERO", "name"] or kinds == ["KW_ZERO", "name", "EQUAL"]


def _hint(token: Token, expected: set[str], in_zero: bool = False) -> str:
    if in_zero:
        return "a ZeRO config is written `zero NAME { ... }` or `zero NAME = file(\"x.json\")`"
    if "KW_ON" in expected:
        return "`train` lists models separated by `,`, then `on LOSS`: `train a, b on total`"
    if "RPAR" in expected and "COMMA" in expected:
        return "separate arguments with `,` and close the list with `)`"
    if "EQUAL" in expected:
        return "declarations and settings are written `NAME = value`"
    if token.type in ("NAME", "NUMBER") and "RBRACE" in expected:
        return "inside a block write `key = value` or a bare flag such as `frozen`"
    return "see docs/language.md for the form of each declaration"


def _report_unexpected_end(source: SourceFile, diags: Diagnostics) -> None:
    opener = _unclosed_bracket(source.text)
    if opener is not None:
        char = source.text[opener]
        closing = {"{": "}", "(": ")", "[": "]"}[char]
        diags.add("DSG103", source.span_at(opener), f"the file ends before this `{char}` is closed",
                  f"add the missing `{closing}`")
    else:
        end = source.span_at(max(0, len(source.text.rstrip()) - 1))
        diags.add("DSG103", end, "the file ends in the middle of a declaration",
                  "finish the declaration or remove it")


def _brackets(text: str):
    """(offset, char) of each bracket outside strings and comments."""
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if char == '"':
            end = i + 1
            while end < n and text[end] not in '"\n':
                end += 2 if text[end] == "\\" else 1
            i = end + 1
            continue
        if char in "{([})]":
            yield i, char
        i += 1


def _unclosed_bracket(text: str) -> int | None:
    """The offset of the innermost bracket still open at the end (strings and comments skipped)."""
    stack: list[int] = []
    for offset, char in _brackets(text):
        if char in "{([":
            stack.append(offset)
        elif stack:
            stack.pop()
    return stack[-1] if stack else None


# -- parse tree -> AST -----------------------------------------------------------------------

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


class _ToAst:
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

    def _binop(op):  # noqa: N805 - a small factory for the four operator rules
        def build(self, meta, children):
            return ast.BinOp(op, children[0], children[1], self._span(meta))
        return build

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")

    def neg(self, meta, children):
        return ast.Neg(children[0], self._span(meta))


@lru_cache(maxsize=1)
def _value_parser() -> Lark:
    text = grammar_path().read_text(encoding="utf-8")
    return Lark(text, parser="lalr", propagate_positions=True, maybe_placeholders=True, start="value")


def parse_value(source: SourceFile, offset: int, diags: Diagnostics):
    """Parse `source.text[offset:]` as one value (for `--set key=value`); spans point into it."""
    text = source.text[offset:]
    try:
        tree = _value_parser().parse(text)
    except UnexpectedInput as error:
        column = getattr(error, "column", 1) if isinstance(getattr(error, "column", None), int) else 1
        span = source.span_at(offset + max(0, column - 1))
        diags.add("DSG203", span, f"`{text}` is not a value", "write a number, a string in double quotes, "
                  "true/false, a name, or a list `[1, 2]`")
        return None
    value = _ToAst(source.name).transform(tree) if isinstance(tree, Tree) else None
    if value is None:
        return None
    return _shift(value, offset)


def _shift(node, offset: int):
    """Move a value's spans right by `offset` columns (it was parsed without its `key=` prefix)."""
    import dataclasses

    if isinstance(node, tuple):
        return tuple(_shift(n, offset) for n in node)
    if not dataclasses.is_dataclass(node):
        return node
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if isinstance(value, Span):
            changes[f.name] = Span(value.file, value.line, value.col + offset, value.end_line, value.end_col + offset)
        elif dataclasses.is_dataclass(value) or isinstance(value, tuple):
            changes[f.name] = _shift(value, offset)
    return dataclasses.replace(node, **changes)
