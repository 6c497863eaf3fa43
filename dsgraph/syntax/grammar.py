"""The grammar (grammars/dsgraph.lark, the reference for the language) and its Lark parsers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lark import Lark


def grammar_path() -> Path:
    """The grammar ships inside the package in a wheel, and at the top level in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "grammars" / "dsgraph.lark", here.parent / "grammars" / "dsgraph.lark"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("grammars/dsgraph.lark is missing from the dsgraph installation")


_OPTIONS = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}


@lru_cache(maxsize=1)
def file_parser() -> Lark:
    """The parser of whole files (start rule `start`)."""
    text = grammar_path().read_text(encoding="utf-8")
    try:  # Lark stores the LALR tables in a temp file keyed by the grammar's hash.
        return Lark(text, cache=True, **_OPTIONS)
    except OSError:
        return Lark(text, **_OPTIONS)


@lru_cache(maxsize=1)
def value_parser() -> Lark:
    """The parser of one value (start rule `value`), for `--set key=value`."""
    return Lark(grammar_path().read_text(encoding="utf-8"), start="value", **_OPTIONS)
