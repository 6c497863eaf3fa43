"""The loading stage: a file's `include`s, read and parsed, so that lowering sees every `zero`
block the pipeline may name (DSG107). Paths are relative to the including file; a file included
twice (`a` and `b` both include `c`) is read once, and a cycle is reported where it closes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsgraph.diagnostics import Diagnostics
from dsgraph.source import SourceFile
from dsgraph.syntax import ast
from dsgraph.syntax.parse import parse


@dataclass(frozen=True)
class SharedZero:
    """A top-level `zero` declaration and the file it is written in."""

    decl: ast.ZeroDecl
    file: str


@dataclass(frozen=True)
class Loaded:
    """A parsed file with the top-level `zero` declarations of itself and of what it includes."""

    tree: ast.File
    source: SourceFile
    zeros: tuple[SharedZero, ...]


def load(tree: ast.File, source: SourceFile, diags: Diagnostics, sources: dict[str, SourceFile]) -> Loaded:
    """`sources` receives every included file (for the carets of later diagnostics)."""
    return Loaded(tree, source, tuple(_zeros(tree, source, diags, sources, [source.name], set())))


def _zeros(
    tree: ast.File,
    source: SourceFile,
    diags: Diagnostics,
    sources: dict[str, SourceFile],
    chain: list[str],
    seen: set[Path],
) -> list[SharedZero]:
    found = [SharedZero(item, source.name) for item in tree.items if isinstance(item, ast.ZeroDecl)]
    for inc in (i for i in tree.items if isinstance(i, ast.Include)):
        path = Path(source.name).parent / inc.path.value
        if "\0" in inc.path.value:  # no file system takes it
            diags.add(
                "DSG107",
                inc.path.span,
                "an included path cannot hold a NUL character",
                "write the path of a .dsg file, relative to this file",
            )
            continue
        if path.resolve() in {Path(c).resolve() for c in chain}:  # `a/../a.dsg` is `a.dsg`
            diags.add(
                "DSG107",
                inc.path.span,
                f"`{inc.path.value}` includes itself through {' -> '.join(chain)}",
                "remove one of the includes",
            )
            continue
        if not path.is_file():
            diags.add(
                "DSG107",
                inc.path.span,
                f"included file `{inc.path.value}` does not exist",
                f"paths are relative to the including file; looked for {path}",
            )
            continue
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        included = SourceFile.read(path)
        sources[included.name] = included
        sub = parse(included, diags)
        if sub is None:
            continue
        if any(isinstance(i, ast.Pipeline) for i in sub.items):
            diags.add(
                "DSG107",
                inc.path.span,
                f"included file `{inc.path.value}` declares a pipeline",
                "an included file holds only `zero` blocks and further `include`s",
            )
            continue
        found += _zeros(sub, included, diags, sources, [*chain, str(path)], seen)
    return found
