"""Source files and spans: every diagnostic and plan step points back here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Span:
    """A region of a source file. Lines and columns are 1-based; `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"

    def to_json(self) -> dict[str, str | int]:
        return {
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "end_line": self.end_line,
            "end_col": self.end_col,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Span:
        return Span(data["file"], data["line"], data["col"], data["end_line"], data["end_col"])


@dataclass(frozen=True, slots=True)
class SourceFile:
    """The text of one file, as read once. `name` is the path as the user wrote it."""

    name: str
    text: str

    @staticmethod
    def read(path: str | Path) -> SourceFile:
        return SourceFile(str(path), Path(path).read_text(encoding="utf-8", errors="replace"))

    def line_text(self, line: int) -> str:
        lines = self.text.splitlines()
        return lines[line - 1] if 0 < line <= len(lines) else ""

    def span_at(self, offset: int, length: int = 1) -> Span:
        """The span of `length` characters starting at character `offset`."""
        offset = max(0, min(offset, len(self.text)))
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return Span(self.name, line, col, line, col + max(1, length))

    def whole(self) -> Span:
        return Span(self.name, 1, 1, 1, 2)
