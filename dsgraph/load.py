"""The loading stage: a file's `include`s, read and parsed, so that lowering sees every `zero`
block the pipeline may name (DSG107). Paths are relative to the including file; a file included
twice (`a` and `b` both include `c`) is read once, and a cycle is reported where it closes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dsgraph.diagnostics import Diagnostics
from dsgraph.source import InputTooLarge, SourceFile
from dsgraph.syntax import ast
from dsgraph.syntax.parse import parse


MAX_INCLUDE_DEPTH = 32  # files deep: an include chain longer than this is a mistake


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
    complete: bool  # False when an include could not be loaded: a `zero` block may be missing


def load(tree: ast.File, source: SourceFile, diags: Diagnostics, sources: dict[str, SourceFile]) -> Loaded:
    """`sources` receives every included file (for the carets of later diagnostics)."""
    before = len(diags.items)
    zeros = tuple(_zeros(tree, source, diags, sources, [source.name], set()))
    return Loaded(tree, source, zeros, complete=not any(d.is_error for d in diags.items[before:]))


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
        included = _read(inc, source, diags, chain, seen)
        if included is None:
            continue
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
        found += _zeros(sub, included, diags, sources, [*chain, included.name], seen)
    return found


def _read(
    inc: ast.Include, source: SourceFile, diags: Diagnostics, chain: list[str], seen: set[Path]
) -> SourceFile | None:
    """The included file, read once; None when it is reported (DSG107, DSG105) or already read."""
    path = Path(source.name).parent / inc.path.value

    def report(message: str, help: str, code: str = "DSG107") -> None:
        diags.add(code, inc.path.span, message, help)

    if "\0" in inc.path.value:  # no file system takes it
        report("an included path cannot hold a NUL character", "write the path of a .dsg file, relative to this file")
        return None
    if len(chain) > MAX_INCLUDE_DEPTH:
        report(
            f"includes nest deeper than {MAX_INCLUDE_DEPTH} files",
            "include the shared `zero` blocks from fewer levels",
        )
        return None
    try:
        resolved = path.resolve(strict=True)
        cycle = resolved in {Path(c).resolve() for c in chain}  # `a/../a.dsg` is `a.dsg`
    except FileNotFoundError:
        report(
            f"included file `{inc.path.value}` does not exist",
            f"paths are relative to the including file; looked for {path}",
        )
        return None
    except (OSError, RuntimeError) as error:  # a symlink loop, a path too long, no permission
        report(f"included file `{inc.path.value}` cannot be resolved: {_reason(error)}", "include a regular .dsg file")
        return None
    if cycle:
        report(f"`{inc.path.value}` includes itself through {' -> '.join(chain)}", "remove one of the includes")
        return None
    if not resolved.is_file():
        report(f"included `{inc.path.value}` is not a file", f"include a .dsg file; {path} is not one")
        return None
    if resolved in seen:
        return None
    seen.add(resolved)
    try:
        return SourceFile.read(path)
    except InputTooLarge as error:
        report(
            f"included file `{inc.path.value}` is {error.size:,} bytes long; it was not read",
            f"a .dsg file may hold at most {error.limit:,} bytes",
            "DSG105",
        )
    except OSError as error:
        report(f"included file `{inc.path.value}` cannot be read: {_reason(error)}", "check its permissions")
    return None


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)
