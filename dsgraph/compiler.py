"""The stages in order, each a named function returning a frozen value:

    parse -> [--set overrides] -> load includes -> lower -> [zero = auto] -> build the graph
    -> analyse -> decide the strategy -> resolve the DeepSpeed configs -> hoist -> check -> plan

Diagnostics are collected along the way; only a syntax error stops early, and the plan is built
only when no check reported an error. Imports no torch, deepspeed, accelerate and no user code
(a test holds this), unless the file says `zero = auto`: then its models are sized on the meta
device (dsgraph.dsconfig.auto)."""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


from dsgraph.graph import Graph
from dsgraph import graph as graph_mod
from dsgraph import ir as ir_mod
from dsgraph.analysis import Analysis, analyse
from dsgraph.checks import Context, run_checks
from dsgraph.diagnostics import Diagnostic, Diagnostics
from dsgraph.dsconfig.auto import has_auto, has_auto_gather, resolve_auto, resolve_gather
from dsgraph.dsconfig.resolve import Resolved, resolve_configs
from dsgraph.hoist import Hoisting, hoist
from dsgraph.load import load
from dsgraph.lower.pipeline import lower
from dsgraph.overrides import apply_overrides
from dsgraph.plan import Plan
from dsgraph.planner import build_plan
from dsgraph.source import InputTooLarge, SourceFile
from dsgraph.strategy import Strategy, decide
from dsgraph.syntax import ast as ast_mod
from dsgraph.syntax.parse import parse


@dataclass(frozen=True)
class Compilation:
    """Everything one compile produced; a stage's result is None when it could not run."""

    source: SourceFile
    sources: dict[str, SourceFile]  # every file read: carets of diagnostics in any of them
    diagnostics: list[Diagnostic]
    ast: ast_mod.File | None = None
    ir: ir_mod.Pipeline | None = None
    graph: Graph | None = None
    analysis: Analysis | None = None
    strategy: Strategy | None = None
    configs: Mapping[str, Resolved] | None = None
    plan: Plan | None = None
    hoisting: Hoisting | None = None

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Compiling allocates many small objects and frees none of them cyclically; the cyclic
    collector's passes over them cost ~40% of a large compile, so it pauses meanwhile."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compile_source(
    source: SourceFile,
    world_size: int | None = None,
    overrides: tuple[str, ...] = (),
    device_memory: int | None = None,
    trust_user_code: bool = False,
) -> Compilation:
    """`overrides` are `--set key=value` strings, applied to the AST before lowering;
    `device_memory` (bytes per device) is what `zero = auto` plans for; `trust_user_code` lets
    `zero = auto` build factory models on the meta device to size them (`dsgraph run`)."""
    with _no_gc():
        return _compile(source, world_size, overrides, device_memory, trust_user_code)


def _compile(
    source: SourceFile,
    world_size: int | None,
    overrides: tuple[str, ...],
    device_memory: int | None,
    trust_user_code: bool,
) -> Compilation:
    diags = Diagnostics()
    sources = {source.name: source}
    tree = parse(source, diags)
    if tree is None:
        return Compilation(source, sources, diags.sorted())
    if overrides:
        tree = apply_overrides(tree, list(overrides), diags, sources)
    pipeline = lower(load(tree, source, diags, sources), diags, sources)
    if pipeline is None:
        return Compilation(source, sources, diags.sorted(), tree)
    if has_auto(pipeline):  # sizes the models on the meta device: imports torch
        pipeline = resolve_auto(pipeline, diags, world_size, device_memory, trust_user_code)
    if has_auto_gather(pipeline):  # sizes them too, for a ZeRO-3 generator only
        pipeline = resolve_gather(pipeline, world_size, device_memory, trust_user_code)
    graph = graph_mod.build(pipeline)
    analysis = analyse(pipeline, graph)
    strategy = decide(pipeline, analysis) if analysis else None
    configs = resolve_configs(pipeline, analysis, world_size) if analysis else None
    hoisting = hoist(pipeline, graph, analysis, world_size) if analysis else None
    diags.extend(run_checks(Context(pipeline, graph, analysis, strategy, configs, hoisting)))
    plan = None
    if not diags.has_errors and analysis and strategy and configs is not None and hoisting is not None:
        plan = build_plan(pipeline, graph, analysis, strategy, configs, hoisting, world_size)
    return Compilation(
        source, sources, diags.sorted(), tree, pipeline, graph, analysis, strategy, configs, plan, hoisting
    )


def compile_file(
    path: str | Path,
    world_size: int | None = None,
    overrides: tuple[str, ...] = (),
    device_memory: int | None = None,
    trust_user_code: bool = False,
) -> Compilation:
    """Raises OSError when the file cannot be read; a file too large is a diagnostic (DSG105)."""
    try:
        source = SourceFile.read(path)
    except InputTooLarge as error:
        empty = SourceFile(str(path), "")
        diags = Diagnostics()
        diags.add(
            "DSG105",
            empty.whole(),
            f"the file is {error.size:,} bytes long; it was not read",
            f"a .dsg file may hold at most {error.limit:,} bytes; split it with `include`",
        )
        return Compilation(empty, {empty.name: empty}, diags.sorted())
    return compile_source(source, world_size, overrides, device_memory, trust_user_code)
