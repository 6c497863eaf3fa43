"""The stages in order: parse -> AST -> IR -> graph -> checks -> plan.

Imports no torch, deepspeed, accelerate and no user code (a test holds this), unless the file
says `zero = auto`: then its models are sized on the meta device (dsgraph.zeroauto)."""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from dsgraph import graph as graph_mod
from dsgraph import ir as ir_mod
from dsgraph.checks import Context, run_checks
from dsgraph.diagnostics import Diagnostic, Diagnostics
from dsgraph.lower import lower
from dsgraph.overrides import apply_overrides
from dsgraph.plan import Plan, build_plan
from dsgraph.source import SourceFile
from dsgraph.syntax import ast as ast_mod
from dsgraph.syntax.parser import parse


@dataclass
class Compilation:
    """Everything one compile produced; later stages are None when an earlier one failed."""

    source: SourceFile
    sources: dict[str, SourceFile]
    diagnostics: list[Diagnostic]
    ast: ast_mod.File | None = None
    ir: ir_mod.Pipeline | None = None
    graph: nx.DiGraph | None = None
    context: Context | None = None
    plan: Plan | None = None

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


@contextmanager
def _no_gc():
    """Compiling allocates many small objects and frees none of them cyclically; the cyclic
    collector's passes over them cost ~40% of a large compile, so it pauses meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compile_source(source: SourceFile, world_size: int | None = None,
                   overrides: tuple[str, ...] = (), device_memory: int | None = None) -> Compilation:
    """`overrides` are `--set key=value` strings, applied to the AST before lowering;
    `device_memory` (bytes per device) is what `zero = auto` plans for."""
    with _no_gc():
        return _compile(source, world_size, overrides, device_memory)


def _compile(source: SourceFile, world_size: int | None, overrides: tuple[str, ...],
             device_memory: int | None = None) -> Compilation:
    diags = Diagnostics()
    sources = {source.name: source}
    result = Compilation(source, sources, [])
    result.ast = parse(source, diags)
    if result.ast is not None and overrides:
        result.ast = apply_overrides(result.ast, list(overrides), diags, sources)
    if result.ast is not None:
        result.ir = lower(result.ast, source, diags, sources)
    if result.ir is not None and any(m.zero == ir_mod.ZERO_AUTO for m in result.ir.models.values()):
        from dsgraph.zeroauto import resolve_auto   # sizes the models on the meta device: torch

        result.ir = resolve_auto(result.ir, diags, world_size, device_memory)
    if result.ir is not None:
        result.graph = graph_mod.build(result.ir)
        result.context = Context(result.ir, result.graph, diags, world_size)
        run_checks(result.context)
        if not diags.has_errors:
            result.plan = build_plan(result.context)
    result.diagnostics = diags.sorted()
    return result


def compile_file(path: str | Path, world_size: int | None = None,
                 overrides: tuple[str, ...] = (), device_memory: int | None = None) -> Compilation:
    return compile_source(SourceFile.read(path), world_size, overrides, device_memory)
