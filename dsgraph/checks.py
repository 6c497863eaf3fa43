"""The checks: one function per rule, run in the order of CHECKS. Each reads the pipeline, its
graph and (once the graph is known to be acyclic) its analysis, and adds diagnostics."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from dsgraph import dsconfig, ir
from dsgraph import graph as g
from dsgraph.analysis import Analysis, Role, analyse
from dsgraph.diagnostics import Diagnostics, Note
from dsgraph.strategy import Engine, Strategy, decide


@dataclass
class Context:
    pipeline: ir.Pipeline
    graph: nx.DiGraph
    diags: Diagnostics
    world_size: int | None
    analysis: Analysis | None = None
    strategy: Strategy | None = None
    resolved: dict[str, dsconfig.Resolved] = field(default_factory=dict)


def check_loss_cycles(ctx: Context) -> None:
    """DSG305; on success, computes the analysis the later checks read."""
    flow = g.dataflow(ctx.graph)
    losses = ctx.pipeline.losses
    seen: set[frozenset] = set()
    refs = flow.subgraph(n for n in flow if n.startswith(("loss:", "term:")))
    cycles = [] if nx.is_directed_acyclic_graph(refs) else nx.simple_cycles(refs)   # the common case is cheap
    for cycle in cycles:
        names = sorted(ctx.graph.nodes[n]["name"] for n in cycle if n.startswith("loss:"))
        if frozenset(names) in seen:
            continue
        seen.add(frozenset(names))
        first = losses[names[0]]
        ctx.diags.add("DSG305", first.span, f"losses refer to each other in a cycle: "
                      f"{' -> '.join(names + [names[0]])}", "break the cycle: a loss cannot depend on itself",
                      *(Note(f"`{n}` is declared here", losses[n].span) for n in names[1:]))
    if not seen:
        ctx.analysis = analyse(ctx.pipeline, ctx.graph)
        ctx.strategy = decide(ctx.pipeline, ctx.analysis)


def check_something_trained(ctx: Context) -> None:
    if not ctx.pipeline.trains and ctx.pipeline.complete:
        ctx.diags.add("DSG308", ctx.pipeline.span, f"pipeline `{ctx.pipeline.name}` trains nothing",
                      "add `train MODEL on LOSS`")


def check_train_statements(ctx: Context) -> None:
    """DSG301 frozen model trained, DSG306 model in two trains, DSG311 loss in two trains."""
    models, first_model, first_loss = ctx.pipeline.models, {}, {}
    for train in ctx.pipeline.trains:
        for name, span in zip(train.models, train.model_spans):
            model = models.get(name)
            if model is not None and model.frozen:
                ctx.diags.add("DSG301", span, f"model `{name}` is frozen but `train` asks to update it",
                              f"remove `{name}` from `train`, or drop `frozen` from its declaration",
                              Note(f"`{name}` is declared frozen here", model.spans.get("frozen", model.span)))
            if name in first_model:
                ctx.diags.add("DSG306", span, f"model `{name}` is trained by two `train` statements",
                              f"train it once on a combined loss: `loss both = a + b` then `train {name} on both`",
                              Note("first trained here", first_model[name]))
            first_model.setdefault(name, span)
        if train.loss in first_loss:
            ctx.diags.add("DSG311", train.loss_span, f"loss `{train.loss}` is used by two `train` statements",
                          f"list every model it trains in one statement: `train a, b on {train.loss}`",
                          Note("first used here", first_loss[train.loss]))
        first_loss.setdefault(train.loss, train.loss_span)


def check_unused(ctx: Context) -> None:
    """DSG303 unused model, DSG309 implicitly frozen, DSG304 unused loss, DSG310 unused data/zero."""
    if ctx.analysis is None or not ctx.pipeline.complete:
        return
    p, roles = ctx.pipeline, ctx.analysis.roles
    trained_models = {m for t in p.trains for m in t.models}
    for name, model in p.models.items():
        called = any(True for _ in ctx.graph.successors(g.model_id(name)))
        if not called and name not in trained_models:      # frozen or not, nothing runs it
            ctx.diags.add("DSG303", model.span, f"model `{name}` is declared but no loss uses it",
                          f"use it in a loss (`{name}(data.field)`) or remove it")
        elif roles[name] is Role.FROZEN and not model.frozen and name not in trained_models:
            ctx.diags.add("DSG309", model.span, f"model `{name}` is used but never trained; it runs frozen",
                          "say so with `frozen` in its block, or add it to a `train` statement")
    reached = set().union(*(grp.reach for grp in ctx.analysis.groups)) if ctx.analysis.groups else set()
    for name, loss in p.losses.items():
        if g.loss_id(name) not in reached:
            ctx.diags.add("DSG304", loss.span, f"loss `{name}` is computed by no `train` statement",
                          f"train a model on it (`train MODEL on {name}`) or remove it")
    for name, data in p.data.items():
        if not any(True for _ in ctx.graph.successors(g.data_id(name))):
            ctx.diags.add("DSG310", data.span, f"data set `{name}` is declared but no loss or model reads it",
                          f"read a field of it (`{name}.FIELD`) or remove it")
    used_zeros = {m.zero for m in p.models.values()}
    for name, zero in p.zeros.items():
        if name not in used_zeros and "." not in name and zero.span.file == p.file:
            ctx.diags.add("DSG310", zero.span, f"ZeRO config `{name}` is declared but no model uses it",
                          f"use it with `zero = {name}` in a model block, or remove it")


def check_trained_models_reached(ctx: Context) -> None:
    if ctx.analysis is None or not ctx.pipeline.complete:
        return
    groups = {grp.index: grp for grp in ctx.analysis.groups}
    for train in ctx.pipeline.trains:
        group = groups.get(train.index)
        if group is None:
            continue
        for name, span in zip(train.models, train.model_spans):
            calls = [n for n in ctx.graph.successors(g.model_id(name))] if name in ctx.pipeline.models else []
            if name in ctx.pipeline.models and not any(c in group.reach for c in calls):
                ctx.diags.add("DSG302", span, f"loss `{train.loss}` does not depend on model `{name}`",
                              f"use `{name}(...)` in `{train.loss}`, or train `{name}` on a loss that does",
                              Note(f"`{train.loss}` is declared here", ctx.pipeline.losses[train.loss].span))


def check_gradient_groups(ctx: Context) -> None:
    """DSG307: a call whose gradients would reach two train groups, or whose backward would run
    through a model that another group trains (its engine would see foreign gradients)."""
    if ctx.analysis is None:
        return
    a, trains = ctx.analysis, {t.index: t for t in ctx.pipeline.trains}
    trained_in: dict[str, int] = {}     # a model trained twice is DSG306's, not ours
    for train in ctx.pipeline.trains:
        for name in set(train.models):
            trained_in[name] = trained_in.get(name, 0) + 1
    for call, owners in a.call_groups.items():
        model = ctx.graph.nodes[call]["model"]
        home = a.group_of_model.get(model) if a.roles.get(model) is Role.TRAINED else None
        if len(owners) > 1:
            groups = [trains[i] for i in sorted(owners)]
            ctx.diags.add("DSG307", ctx.graph.nodes[call]["span"],
                          f"gradients of `{call[5:]}` would flow into {len(owners)} train groups "
                          f"({', '.join(t.loss for t in groups)})",
                          "train these models on one shared loss (`train a, b on total`), or keep each "
                          "model's output out of the other group's loss",
                          *(Note(f"train group of `{t.loss}`", t.span) for t in groups))
        elif owners and home is not None and home not in owners and trained_in.get(model) == 1:
            (other,) = owners
            ctx.diags.add("DSG307", ctx.graph.nodes[call]["span"],
                          f"the backward of `{trains[other].loss}` would run through `{model}`, which "
                          f"`train ... on {trains[home].loss}` updates",
                          f"train `{model}` in the same statement (`train ..., {model} on ...`), or make "
                          f"`{trains[other].loss}` use a call of `{model}` that does not depend on a trained model",
                          Note(f"`{model}` is trained here", trains[home].span))


def check_frozen_configs(ctx: Context) -> None:
    """DSG401 frozen model with an optimizer, DSG402 ZeRO-1/2 on a frozen model."""
    if ctx.analysis is None:
        return
    for name, model in ctx.pipeline.models.items():
        if ctx.analysis.roles[name] is not Role.FROZEN:
            continue
        for prop in ("optimizer", "scheduler", "clip", "lora"):
            if prop in model.spans and model.frozen:
                ctx.diags.add("DSG401", model.spans[prop], f"frozen model `{name}` has `{prop}`",
                              f"remove `{prop}`: a frozen model is never updated")
        stage = dsconfig.stage_of(ctx.pipeline, model)
        if stage in (1, 2):
            zero = dsconfig.zero_of(ctx.pipeline, model)
            ctx.diags.add("DSG402", zero.span_of("zero_optimization.stage") if zero else model.span,
                          f"frozen model `{name}` uses ZeRO-{stage}, which shards only optimizer state "
                          "and gradients: a frozen model has neither",
                          "use `stage = 3` to shard its parameters, or `stage = 0`",
                          Note(f"`{name}` is declared here", model.span))


def check_shared_groups(ctx: Context) -> None:
    """DSG403 ZeRO-0 and DSG404 fp16 in a shared-loss group."""
    if ctx.analysis is None:
        return
    for group in ctx.analysis.groups:
        if not group.shared:
            continue
        train = next(t for t in ctx.pipeline.trains if t.index == group.index)
        for name, span in zip(train.models, train.model_spans):
            model = ctx.pipeline.models.get(name)
            if model is None:
                continue
            if dsconfig.stage_of(ctx.pipeline, model) == 0:
                ctx.diags.add("DSG403", span, f"model `{name}` shares loss `{group.loss}` but runs ZeRO-0",
                              "DeepSpeed refuses a direct backward into a ZeRO-0 engine: use stage 1, 2 or 3")
            if dsconfig.precision_of(ctx.pipeline, model) is ir.Precision.FP16:
                ctx.diags.add("DSG404", span, f"model `{name}` shares loss `{group.loss}` in fp16",
                              "each fp16 engine has its own loss scaler, so one loss cannot be scaled for "
                              "all: use bf16 or fp32")


def check_offload_param(ctx: Context) -> None:
    for zero in ctx.pipeline.zeros.values():
        offload = zero.config.get("zero_optimization", {}).get("offload_param")
        device = offload.get("device") if isinstance(offload, dict) else None
        if device not in (None, "none") and zero.stage() != 3:
            ctx.diags.add("DSG407", zero.span_of("zero_optimization.offload_param"),
                          f"ZeRO config `{zero.name}` offloads parameters at stage {zero.stage()}",
                          "parameter offload needs `stage = 3`; use `offload_optimizer` at stages 1-2")


def check_resolved_configs(ctx: Context) -> None:
    """Resolves every model's DeepSpeed config; DSG405/406/412/413/414 come from there."""
    if ctx.analysis is None:
        return
    for name, model in ctx.pipeline.models.items():
        trained = ctx.analysis.roles[name] is Role.TRAINED
        resolved = dsconfig.resolve(ctx.pipeline, model, trained, ctx.world_size)
        ctx.resolved[name] = resolved
        zero = dsconfig.zero_of(ctx.pipeline, model)
        for problem in resolved.problems:
            span = _config_span(zero, problem.path) if zero else None
            message = problem.message
            if problem.code == "DSG405" and ctx.strategy and len(set(ctx.strategy.accelerator_of.values())) > 1 \
                    and ctx.strategy.engine_of(name, ctx.analysis) is Engine.ACCELERATE:
                message += "; Accelerators share one gradient-accumulation state"
            if problem.code == "DSG414" and "precision" in model.spans:
                span = model.spans["precision"]
            named = not span or f"model `{name}`" in message     # located in the config: say whose
            ctx.diags.add(problem.code, span or model.span, message if named else f"{message} (model `{name}`)",
                          problem.help, *((Note(f"model `{name}` is declared here", model.span),) if span else ()))


def _config_span(zero: ir.ZeroConfig, path: str):
    """Where the config sets `path`, or else the nearest enclosing key it sets; None if neither."""
    while path:
        if path in zero.key_spans:
            return zero.key_spans[path]
        path = path.rpartition(".")[0]
    return None


CHECKS = (
    check_loss_cycles,
    check_something_trained,
    check_train_statements,
    check_unused,
    check_trained_models_reached,
    check_gradient_groups,
    check_frozen_configs,
    check_shared_groups,
    check_offload_param,
    check_resolved_configs,
)


def run_checks(ctx: Context) -> None:
    for check in CHECKS:
        check(ctx)
