"""Diagnostics: a code, a message stating the fact, a span, and a help line stating the fix.

Rendered as `file:line:col: error[DSG301]: message`, then the source line with carets, then
`= help:` and `= note:` lines. The JSON form carries the same fields."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dsgraph.codes import Severity, lookup
from dsgraph.source import SourceFile, Span


@dataclass(frozen=True, slots=True)
class Note:
    message: str
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class Diagnostic:
    code: str
    message: str
    span: Span
    help: str
    notes: tuple[Note, ...] = ()

    @property
    def severity(self) -> Severity:
        return lookup(self.code).severity

    @property
    def is_error(self) -> bool:
        return self.severity is Severity.ERROR

    def sort_key(self) -> tuple[str, int, int, str, str]:
        return (self.span.file, self.span.line, self.span.col, self.code, self.message)

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "slug": lookup(self.code).slug,
            "severity": self.severity.value,
            "message": self.message,
            "span": self.span.to_json(),
            "help": self.help,
            "notes": [{"message": n.message, "span": n.span.to_json() if n.span else None} for n in self.notes],
        }


def diagnostic(code: str, span: Span, message: str, help: str, *notes: Note) -> Diagnostic:
    """A diagnostic, arguments in the order they read: where, what, how to fix it."""
    return Diagnostic(code, message, span, help, tuple(notes))


@dataclass
class Diagnostics:
    """Collects diagnostics in the order found; reports them sorted by position."""

    items: list[Diagnostic] = field(default_factory=list)

    def add(self, code: str, span: Span, message: str, help: str, *notes: Note) -> None:
        self.items.append(diagnostic(code, span, message, help, *notes))

    def extend(self, found: Iterable[Diagnostic]) -> None:
        self.items.extend(found)

    @property
    def has_errors(self) -> bool:
        return any(d.is_error for d in self.items)

    def sorted(self) -> list[Diagnostic]:
        unique = {(d.sort_key(), d.help): d for d in self.items}
        return [unique[k] for k in sorted(unique)]


MAX_SNIPPET = 160  # characters of a source line shown; a longer line is cut around the caret


def render_snippet(span: Span, source: SourceFile | None) -> list[str]:
    if source is None:
        return []
    raw = source.line_text(span.line)
    end = span.end_col if span.end_line == span.line else len(raw) + 1
    # A line of a megabyte is shown as the part around the caret, never whole.
    cut = max(0, span.col - 1 - MAX_SNIPPET // 2) if len(raw) > MAX_SNIPPET else 0
    shown = raw[cut : cut + MAX_SNIPPET]
    col, end = span.col - cut, min(end - cut, len(shown) + 1)
    prefix, suffix = ("..." if cut else ""), ("..." if cut + MAX_SNIPPET < len(raw) else "")
    # Columns count characters; a tab is drawn 4 wide, so measure the caret on the drawn text.
    start = len(prefix) + len(shown[: col - 1].expandtabs(4))
    width = max(1, len(prefix) + len(shown[: end - 1].expandtabs(4)) - start)
    gutter = " " * len(str(span.line))
    return [
        f"{gutter} |",
        f"{span.line} | {prefix}{shown.expandtabs(4)}{suffix}",
        f"{gutter} | {' ' * start}{'^' * width}",
    ]


# Control characters of a file are drawn as their Unicode pictures (ESC as U+241B), one column
# each: a file being checked cannot move the cursor, retitle or clear the terminal.
_VISIBLE = {code: 0x2400 + code for code in range(0x20) if code not in (0x09, 0x0A)} | {0x7F: 0x2421}


def render_text(diag: Diagnostic, sources: dict[str, SourceFile]) -> str:
    return _render_text(diag, sources).translate(_VISIBLE)


def _render_text(diag: Diagnostic, sources: dict[str, SourceFile]) -> str:
    lines = [f"{diag.span}: {diag.severity.value}[{diag.code}]: {diag.message}"]
    lines += render_snippet(diag.span, sources.get(diag.span.file))
    pad = " " * len(str(diag.span.line))
    if diag.help:
        lines.append(f"{pad} = help: {diag.help}")
    for note in diag.notes:
        where = f": {note.span}" if note.span else ""
        lines.append(f"{pad} = note: {note.message}{where}")
    return "\n".join(lines)


def render_summary(diagnostics: list[Diagnostic], filename: str) -> str:
    errors = sum(d.is_error for d in diagnostics)
    warnings = len(diagnostics) - errors
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return f"found {' and '.join(parts)} in {filename}" if parts else f"no problems in {filename}"


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """` did you mean `x`?` or an empty string."""
    import difflib

    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""
