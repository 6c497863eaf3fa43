"""Source files and spans: every diagnostic and plan step points back here.

Every file the compiler reads (the .dsg file, its includes, DeepSpeed JSON files) is read through
`read_bounded`: its size is checked before it is read, and no more than the limit is ever read, so
that no input can make compiling slow or exhaust memory."""

from __future__ import annotations

import functools

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SOURCE_BYTES = 1_000_000  # a .dsg file beyond this is not a pipeline description


class InputTooLarge(ValueError):
    """A file larger than what its reader accepts; nothing of it beyond the limit was read."""

    def __init__(self, path: str, size: int, limit: int):
        self.path, self.size, self.limit = path, size, limit
        super().__init__(f"{path} is {size:,} bytes; at most {limit:,} are read")


def read_bounded(path: str | Path, limit: int) -> str:
    """The text of a file of at most `limit` bytes (decoded as UTF-8, bad bytes replaced; a
    byte-order mark that an editor wrote first is dropped)."""
    size = os.stat(path).st_size
    if size > limit:
        raise InputTooLarge(str(path), size, limit)
    with open(path, "rb") as file:
        data = file.read(limit + 1)  # a file that grew, or a device that never ends
    if len(data) > limit:
        raise InputTooLarge(str(path), len(data), limit)
    return data.decode("utf-8-sig", errors="replace")


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
    def read(path: str | Path, limit: int = MAX_SOURCE_BYTES) -> SourceFile:
        """Raises InputTooLarge, or OSError when the file cannot be read."""
        return SourceFile(str(path), read_bounded(path, limit))

    def line_text(self, line: int) -> str:
        lines = _lines(self.text)
        return lines[line - 1] if 0 < line <= len(lines) else ""

    def span_at(self, offset: int, length: int = 1) -> Span:
        """The span of `length` characters starting at character `offset`."""
        offset = max(0, min(offset, len(self.text)))
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return Span(self.name, line, col, line, col + max(1, length))

    def whole(self) -> Span:
        return Span(self.name, 1, 1, 1, 2)


@functools.lru_cache(maxsize=16)
def _lines(text: str) -> list[str]:
    """The lines of a file, split once however many diagnostics show them (a str caches its hash)."""
    return text.splitlines()
