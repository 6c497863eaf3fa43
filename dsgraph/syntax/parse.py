"""Text -> AST: the parse stage. Only a syntax error stops compilation; the first one is reported
and nothing after it is trusted."""

from __future__ import annotations

from lark import Tree
from lark.exceptions import UnexpectedInput

from dsgraph.diagnostics import Diagnostics
from dsgraph.source import SourceFile
from dsgraph.syntax import ast
from dsgraph.syntax.errors import report_syntax_error, too_deep_tree, too_large
from dsgraph.syntax.grammar import file_parser, value_parser
from dsgraph.syntax.tree import ToAst, shift


def parse(source: SourceFile, diags: Diagnostics) -> ast.File | None:
    """Parse one file. On a syntax error, adds one DSG1xx diagnostic and returns None."""
    if too_large(source, diags):
        return None
    try:
        tree = file_parser().parse(source.text)
    except UnexpectedInput as error:
        report_syntax_error(error, source, diags)
        return None
    if too_deep_tree(tree, source, diags):
        return None
    result: ast.File = ToAst(source.name).transform(tree)
    return result


def parse_value(source: SourceFile, offset: int, diags: Diagnostics) -> ast.Value | None:
    """Parse `source.text[offset:]` as one value (for `--set key=value`); spans point into it."""
    text = source.text[offset:]
    try:
        tree = value_parser().parse(text)
    except UnexpectedInput as error:
        column = getattr(error, "column", 1) if isinstance(getattr(error, "column", None), int) else 1
        span = source.span_at(offset + max(0, column - 1))
        diags.add(
            "DSG203",
            span,
            f"`{text}` is not a value",
            "write a number, a string in double quotes, true/false, a name, or a list `[1, 2]`",
        )
        return None
    value = ToAst(source.name).transform(tree) if isinstance(tree, Tree) else None
    if value is None:
        return None
    shifted: ast.Value = shift(value, offset)
    return shifted
