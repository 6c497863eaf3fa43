"""Syntax errors in plain words: Lark's exceptions become DSG101-DSG104 diagnostics that name
tokens as a reader would (`a name`, `` `)` ``), and inputs too large or too deep become DSG105."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from lark import Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

from dsgraph.diagnostics import Diagnostics
from dsgraph.source import MAX_SOURCE_BYTES, SourceFile, Span
from dsgraph.syntax.grammar import file_parser

MAX_BYTES = MAX_SOURCE_BYTES  # a .dsg file beyond this is not a pipeline description
MAX_DEPTH = 200  # nesting of brackets and of expression trees

_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "FACTORY": "a factory `package.module:function`",
    "$END": "the end of the file",
}


# -- inputs that would exhaust the stack ----------------------------------------------------


def too_large(source: SourceFile, diags: Diagnostics) -> bool:
    """DSG105 for a file too long, or with brackets nested too deeply, to parse safely."""
    if len(source.text) > MAX_BYTES:
        diags.add(
            "DSG105",
            source.whole(),
            f"the file is {len(source.text)} characters long",
            f"a .dsg file may hold at most {MAX_BYTES} characters; split it with `include`",
        )
        return True
    deep = _too_deep(source.text)
    if deep is not None:
        diags.add(
            "DSG105",
            source.span_at(deep),
            f"brackets nest deeper than {MAX_DEPTH} levels",
            "flatten the expression or the block",
        )
        return True
    return False


def too_deep_tree(tree: Tree[Token], source: SourceFile, diags: Diagnostics) -> bool:
    """DSG105 for a parse tree deeper than MAX_DEPTH (a long chain of operators)."""
    deep = _deepest(tree)
    if deep is None:
        return False
    span = Span(source.name, *deep, deep[0], deep[1] + 1) if deep != (0, 0) else source.whole()
    diags.add(
        "DSG105",
        span,
        f"an expression nests deeper than {MAX_DEPTH} levels",
        "split the loss into several `loss` declarations that refer to each other",
    )
    return True


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


def _deepest(tree: Tree[Token]) -> tuple[int, int] | None:
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
        pattern = file_parser().get_terminal(name).pattern
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
    words = sorted(
        {
            e if e.startswith("a") and " " in e else _describe_terminal(e)
            for e in expected
            if not e.startswith("KW_") or e == "KW_ON"
        }
    )
    keywords = sorted(e for e in expected if e.startswith("KW_") and e != "KW_ON")
    if keywords and "a name" not in words:
        words.append("a declaration (" + ", ".join(_describe_terminal(k) for k in keywords) + ")")
    if len(words) > 6:
        words = [*words[:6], "..."]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def report_syntax_error(error: UnexpectedInput, source: SourceFile, diags: Diagnostics) -> None:
    if isinstance(error, UnexpectedCharacters):
        span = Span(source.name, error.line, error.column, error.line, error.column + 1)
        pos = error.pos_in_stream or 0
        char = source.text[pos] if pos < len(source.text) else ""
        if char == '"':
            diags.add(
                "DSG104",
                span,
                "this string has no closing quote on its line",
                'close the string with `"`; strings cannot span lines',
            )
        else:
            diags.add("DSG102", span, f"unexpected character `{char}`", "remove it; comments start with `#`")
        return
    token = getattr(error, "token", None)
    if isinstance(error, UnexpectedEOF) or (isinstance(token, Token) and token.type == "$END"):
        _report_unexpected_end(source, diags)
        return
    assert isinstance(error, UnexpectedToken) and isinstance(token, Token)
    assert token.line is not None and token.column is not None
    span = Span(
        source.name,
        token.line,
        token.column,
        token.end_line or token.line,
        token.end_column or token.column + len(token.value),
    )
    parser: Any = error.interactive_parser  # (untyped in Lark)
    try:  # the exact set of tokens the parser could take here; error.expected over-approximates
        accepted = set(parser.accepts())
    except Exception:
        accepted = set(error.expected)
    expected = _expected_words(accepted or set(error.expected))
    diags.add(
        "DSG101",
        span,
        f"unexpected {_describe_token(token)}; expected {expected}",
        _hint(token, accepted, _in_zero_header(error)),
    )


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
        return 'a ZeRO config is written `zero NAME { ... }` or `zero NAME = file("x.json")`'
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
        diags.add(
            "DSG103",
            source.span_at(opener),
            f"the file ends before this `{char}` is closed",
            f"add the missing `{closing}`",
        )
    else:
        end = source.span_at(max(0, len(source.text.rstrip()) - 1))
        diags.add("DSG103", end, "the file ends in the middle of a declaration", "finish the declaration or remove it")


def _brackets(text: str) -> Iterator[tuple[int, str]]:
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
