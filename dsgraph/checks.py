"""The checks: one pure function per rule, listed in CHECKS. Each reads the `Context` (the
pipeline, its graph and what the earlier stages decided from them) and yields diagnostics; none
computes or changes anything another check reads, so their order does not matter."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import networkx as nx

from dsgraph.graph import Graph
from dsgraph import graph as g
from dsgraph import ir
from dsgraph.analysis import Analysis, Role
from dsgraph.diagnostics import Diagnostic, Note, diagnostic
from dsgraph.hoist import Hoisting
from dsgraph.dsconfig.keys import zero_stage
from dsgraph.dsconfig.resolve import Resolved, precision_of, zero_of
from dsgraph.generation_checks import check_generations, check_group_samples
from dsgraph.plan import Engine, Precision
from dsgraph.source import Span
from dsgraph.strategy import Strategy


@dataclass(frozen=True)
class Context:
    """What the checks read. `analysis`, `strategy` and `configs` are None when the losses form a
    cycle (DSG305): the checks that need them say nothing then."""

    pipeline: ir.Pipeline
    graph: Graph
    analysis: Analysis | None
    strategy: Strategy | None
    configs: Mapping[str, Resolved] | None
    hoisting: Hoisting | None = None


Check = Callable[[Context], Iterator[Diagnostic]]


def check_loss_cycles(ctx: Context) -> Iterator[Diagnostic]:
    """DSG305: losses that refer to each other, directly or through a model call's argument."""
    if ctx.analysis is not None:  # the analysis exists exactly when the dataflow is acyclic
        return
    losses, seen = ctx.pipeline.losses, set()
    for cycle in nx.simple_cycles(g.dataflow(ctx.graph)):
        names = sorted(ctx.graph.nodes[n]["name"] for n in cycle if n.startswith("loss:"))
        if not names or frozenset(names) in seen:
            continue
        seen.add(frozenset(names))
        yield diagnostic(
            "DSG305",
            losses[names[0]].span,
            f"losses refer to each other in a cycle: {' -> '.join([*names, names[0]])}",
            "break the cycle: a loss cannot depend on itself",
            *(Note(f"`{n}` is declared here", losses[n].span) for n in names[1:]),
        )


def check_something_trained(ctx: Context) -> Iterator[Diagnostic]:
    if not ctx.pipeline.trains and ctx.pipeline.complete:
        yield diagnostic(
            "DSG308", ctx.pipeline.span, f"pipeline `{ctx.pipeline.name}` trains nothing", "add `train MODEL on LOSS`"
        )


def check_train_statements(ctx: Context) -> Iterator[Diagnostic]:
    """DSG301 frozen model trained, DSG306 model in two trains, DSG311 loss in two trains."""
    models = ctx.pipeline.models
    first_model: dict[str, Span] = {}
    first_loss: dict[str, Span] = {}
    for train in ctx.pipeline.trains:
        for name, span in zip(train.models, train.model_spans, strict=True):
            model = models.get(name)
            if model is not None and model.frozen:
                yield diagnostic(
                    "DSG301",
                    span,
                    f"model `{name}` is frozen but `train` asks to update it",
                    f"remove `{name}` from `train`, or drop `frozen` from its declaration",
                    Note(f"`{name}` is declared frozen here", model.spans.get("frozen", model.span)),
                )
            if name in first_model:
                yield diagnostic(
                    "DSG306",
                    span,
                    f"model `{name}` is trained by two `train` statements",
                    f"train it once on a combined loss: `loss both = a + b` then `train {name} on both`",
                    Note("first trained here", first_model[name]),
                )
            first_model.setdefault(name, span)
        if train.loss in first_loss:
            yield diagnostic(
                "DSG311",
                train.loss_span,
                f"loss `{train.loss}` is used by two `train` statements",
                f"list every model it trains in one statement: `train a, b on {train.loss}`",
                Note("first used here", first_loss[train.loss]),
            )
        first_loss.setdefault(train.loss, train.loss_span)


def check_unused(ctx: Context) -> Iterator[Diagnostic]:
    """DSG303 unused model, DSG309 implicitly frozen, DSG304 unused loss, DSG310 unused data/zero."""
    if ctx.analysis is None or not ctx.pipeline.complete:
        return
    p, roles = ctx.pipeline, ctx.analysis.roles
    trained_models = {m for t in p.trains for m in t.models}
    for name, model in p.models.items():
        called = any(True for _ in ctx.graph.successors(g.model_id(name)))
        if not called and name not in trained_models:  # frozen or not, nothing runs it
            yield diagnostic(
                "DSG303",
                model.span,
                f"model `{name}` is declared but no loss uses it",
                f"use it in a loss (`{name}(data.field)`) or remove it",
            )
        elif roles[name] is Role.FROZEN and not model.frozen and name not in trained_models:
            yield diagnostic(
                "DSG309",
                model.span,
                f"model `{name}` is used but never trained; it runs frozen",
                "say so with `frozen` in its block, or add it to a `train` statement",
            )
    reached = ctx.analysis.reached
    for name, loss in p.losses.items():
        if g.loss_id(name) not in reached:
            yield diagnostic(
                "DSG304",
                loss.span,
                f"loss `{name}` is computed by no `train` statement",
                f"train a model on it (`train MODEL on {name}`) or remove it",
            )
    eval_sets = {d.eval for d in p.data.values()}
    for name, data in p.data.items():
        if name not in eval_sets and not _read(ctx.graph, name):
            yield diagnostic(
                "DSG310",
                data.span,
                f"data set `{name}` is declared but no loss or model reads it",
                f"read a field of it (`{name}.FIELD`) or remove it",
            )
    used_zeros = {m.zero for m in p.models.values()}
    for name, zero in p.zeros.items():
        if name not in used_zeros and "." not in name and zero.span.file == p.file:
            yield diagnostic(
                "DSG310",
                zero.span,
                f"ZeRO config `{name}` is declared but no model uses it",
                f"use it with `zero = {name}` in a model block, or remove it",
            )


def _read(graph: Graph, data: str) -> bool:
    """Whether a loss or a model call reads the data set."""
    return any(graph.edges[edge]["kind"] == "input" for edge in graph.out_edges(g.data_id(data)))


def check_eval_sets(ctx: Context) -> Iterator[Diagnostic]:
    """DSG312 an eval set that training reads, DSG313 an eval set with nothing to evaluate (or
    `eval_every` without one), DSG314 a loss that reads data with and without eval sets, DSG211 an
    eval set without a field the losses read."""
    if ctx.analysis is None or not ctx.pipeline.complete:
        return
    p, graph = ctx.pipeline, ctx.graph
    evaluated = set(ctx.analysis.evaluated)
    pairs = [(d, p.data[d.eval]) for d in p.data.values() if d.eval is not None and d.eval in p.data]
    for data, held_out in pairs:
        assert data.eval_span is not None
        if any(graph.nodes[n]["kind"] == "generation" for n in graph.successors(g.data_id(data.name))):
            continue  # the prompts of a generation: DSG325 (generation_checks.py)
        if _read(graph, held_out.name):
            yield diagnostic(
                "DSG312",
                data.eval_span,
                f"`{held_out.name}` is the eval set of `{data.name}`, but a loss also reads it in training",
                f"read `{data.name}` in the losses; evaluation reads `{held_out.name}` in its place",
            )
            continue
        readers = [graph.nodes[n]["name"] for n in nx.descendants(graph, g.data_id(data.name)) if n.startswith("loss:")]
        if not readers:  # unread: DSG310 says so
            continue
        partly = set(ctx.analysis.partly_evaluated)  # DSG314 says why those are not evaluated
        if not any(name in evaluated or name in partly for name in readers):
            yield diagnostic(
                "DSG313",
                data.eval_span,
                f"no trained loss reads `{data.name}`, so its eval set `{held_out.name}` has nothing to evaluate",
                f"read `{data.name}` in a loss that a `train` statement uses, or remove `eval`",
            )
            continue
        read = sorted(
            {
                f
                for _, _, e in graph.out_edges(g.data_id(data.name), data=True)
                for f in e.get("field", "").split(",")
                if f
            }
        )
        missing = [f for f in read if held_out.fields is not None and f not in held_out.fields]
        if missing:
            yield diagnostic(
                "DSG211",
                data.eval_span,
                f"eval set `{held_out.name}` has no field {', '.join(f'`{f}`' for f in missing)}, which the losses "
                f"read from `{data.name}`",
                f"its fields are: {', '.join(held_out.fields or ())}",
            )
    if not pairs and p.settings.eval_every and "eval_every" in p.settings.spans:
        yield diagnostic(
            "DSG313",
            p.settings.spans["eval_every"],
            "`eval_every` is set, but no data set has an eval set",
            "name a held-out data set in a data block: `data train = ... { eval = val }`",
        )
    for name in ctx.analysis.partly_evaluated:
        yield diagnostic(
            "DSG314",
            p.losses[name].span,
            f"loss `{name}` reads data sets with and without an eval set, so it is not evaluated",
            "give every data set it reads an eval set, or none",
        )


def check_trained_models_reached(ctx: Context) -> Iterator[Diagnostic]:
    """DSG302: a model in `train` that its loss does not depend on."""
    if ctx.analysis is None or not ctx.pipeline.complete:
        return
    p = ctx.pipeline
    for train in p.trains:
        group = ctx.analysis.group(train.index)
        if group is None:
            continue
        for name, span in zip(train.models, train.model_spans, strict=True):
            if name not in p.models:
                continue
            if not any(call in group.reach for call in ctx.graph.successors(g.model_id(name))):
                yield diagnostic(
                    "DSG302",
                    span,
                    f"loss `{train.loss}` does not depend on model `{name}`",
                    f"use `{name}(...)` in `{train.loss}`, or train `{name}` on a loss that does",
                    Note(f"`{train.loss}` is declared here", p.losses[train.loss].span),
                )


def check_gradient_groups(ctx: Context) -> Iterator[Diagnostic]:
    """DSG307: a call whose gradients would reach two train groups, or whose backward would run
    through a model that another group trains (its engine would see foreign gradients)."""
    if ctx.analysis is None:
        return
    a, trains = ctx.analysis, {t.index: t for t in ctx.pipeline.trains}
    trained_in: dict[str, int] = {}  # a model trained twice is DSG306's, not ours
    for train in ctx.pipeline.trains:
        for name in set(train.models):
            trained_in[name] = trained_in.get(name, 0) + 1
    for call, owners in a.call_groups.items():
        node = ctx.graph.nodes[call]
        model = node["model"]
        home = a.group_of_model.get(model) if a.roles.get(model) is Role.TRAINED else None
        if len(owners) > 1:
            groups = [trains[i] for i in sorted(owners)]
            yield diagnostic(
                "DSG307",
                node["span"],
                f"gradients of `{node['text']}` would flow into "
                f"{len(owners)} train groups ({', '.join(t.loss for t in groups)})",
                "train these models on one shared loss (`train a, b on total`), or keep each "
                "model's output out of the other group's loss",
                *(Note(f"train group of `{t.loss}`", t.span) for t in groups),
            )
        elif owners and home is not None and home not in owners and trained_in.get(model) == 1:
            (other,) = owners
            yield diagnostic(
                "DSG307",
                node["span"],
                f"the backward of `{trains[other].loss}` would run through "
                f"`{model}`, which `train ... on {trains[home].loss}` updates",
                f"train `{model}` in the same statement (`train ..., {model} on ...`), or make "
                f"`{trains[other].loss}` use a call of `{model}` that does not depend on a trained model",
                Note(f"`{model}` is trained here", trains[home].span),
            )


def check_frozen_configs(ctx: Context) -> Iterator[Diagnostic]:
    """DSG401 frozen model with an optimizer, DSG402 ZeRO-1/2 on a frozen model."""
    if ctx.analysis is None or ctx.configs is None:
        return
    for name, model in ctx.pipeline.models.items():
        if ctx.analysis.roles[name] is not Role.FROZEN:
            continue
        for prop in ("optimizer", "scheduler", "clip", "lora"):
            if prop in model.spans and model.frozen:
                yield diagnostic(
                    "DSG401",
                    model.spans[prop],
                    f"frozen model `{name}` has `{prop}`",
                    f"remove `{prop}`: a frozen model is never updated",
                )
        stage = zero_stage(ctx.configs[name].config)
        if stage in (1, 2):
            zero = zero_of(ctx.pipeline, model)
            yield diagnostic(
                "DSG402",
                zero.span_of("zero_optimization.stage") if zero else model.span,
                f"frozen model `{name}` uses ZeRO-{stage}, which shards only optimizer state "
                "and gradients: a frozen model has neither",
                "use `stage = 3` to shard its parameters, or `stage = 0`",
                Note(f"`{name}` is declared here", model.span),
            )


def check_shared_groups(ctx: Context) -> Iterator[Diagnostic]:
    """DSG403 ZeRO-0 and DSG404 fp16 in a shared-loss group."""
    if ctx.analysis is None or ctx.configs is None:
        return
    for group in ctx.analysis.groups:
        if not group.shared:
            continue
        train = next(t for t in ctx.pipeline.trains if t.index == group.index)
        for name, span in zip(train.models, train.model_spans, strict=True):
            model = ctx.pipeline.models.get(name)
            if model is None:
                continue
            if zero_stage(ctx.configs[name].config) == 0:
                yield diagnostic(
                    "DSG403",
                    span,
                    f"model `{name}` shares loss `{group.loss}` but runs ZeRO-0",
                    "DeepSpeed refuses a direct backward into a ZeRO-0 engine: use stage 1, 2 or 3",
                )
            if precision_of(ctx.pipeline, model) is Precision.FP16:
                yield diagnostic(
                    "DSG404",
                    span,
                    f"model `{name}` shares loss `{group.loss}` in fp16",
                    "each fp16 engine has its own loss scaler, so one loss cannot be scaled for all: use bf16 or fp32",
                )


def check_forced_engines(ctx: Context) -> Iterator[Diagnostic]:
    """DSG419: an `engine = ...` that cannot do the job: Accelerate for a shared loss, for models
    of several precisions, or for frozen models beside no Accelerator; two engines asked for the
    models of one group, or for the frozen models (which all run one way)."""
    if ctx.analysis is None or ctx.strategy is None or not ctx.pipeline.complete:
        return
    p, analysis, strategy = ctx.pipeline, ctx.analysis, ctx.strategy

    def span(name: str) -> Span:
        return p.models[name].spans.get("engine", p.models[name].span)

    frozen = sorted(m for m, r in analysis.roles.items() if r is Role.FROZEN)
    sets = [(f"the models of train group {g.index}", list(g.models)) for g in analysis.groups]
    sets.append(("the frozen models", frozen))
    for what, models in sets:
        asked = [m for m in models if p.models[m].engine is not None]
        if len({p.models[m].engine for m in asked}) > 1:
            yield diagnostic(
                "DSG419",
                span(asked[-1]),
                f"{what} ask for different engines",
                "they run on one kind of engine: give them the same `engine`, or none",
                *(Note(f"`{m}` asks for `engine = ...` here", span(m)) for m in asked[:-1]),
            )
    for group in analysis.groups:
        asked = [m for m in group.models if p.models[m].engine is Engine.ACCELERATE]
        if asked and group.shared:
            yield diagnostic(
                "DSG419",
                span(asked[0]),
                f"`{asked[0]}` shares loss `{group.loss}` with {', '.join(m for m in group.models if m != asked[0])}: "
                "Accelerate cannot run one backward into several engines",
                "remove `engine = accelerate`: a shared loss runs on native deepspeed.initialize engines",
            )
    accelerate = [
        m
        for m in p.models
        if analysis.roles[m] is not Role.UNUSED and strategy.engine_of(m, analysis) is Engine.ACCELERATE
    ]
    precisions = sorted({precision_of(p, p.models[m]).value for m in accelerate})
    asked = [m for m in accelerate if p.models[m].engine is Engine.ACCELERATE]
    if asked and len(precisions) > 1:
        yield diagnostic(
            "DSG419",
            span(asked[0]),
            f"`engine = accelerate` puts models of several precisions ({', '.join(precisions)}) on Accelerate, "
            "which has one mixed_precision",
            "give them one precision, or let dsgraph choose native engines (remove `engine`)",
        )
    frozen_asked = [m for m in frozen if p.models[m].engine is Engine.ACCELERATE]
    if frozen_asked and strategy.frozen is not None and strategy.frozen.engine is not Engine.ACCELERATE:
        yield diagnostic(
            "DSG419",
            span(frozen_asked[0]),
            f"frozen model `{frozen_asked[0]}` asks for Accelerate, but no trained model runs on an Accelerator",
            "frozen models are prepared by the first Accelerator: remove `engine = accelerate`",
        )


def check_offload_param(ctx: Context) -> Iterator[Diagnostic]:
    """DSG407: parameter offload below ZeRO-3."""
    for zero in ctx.pipeline.zeros.values():
        offload = zero.config.get("zero_optimization", {}).get("offload_param")
        device = offload.get("device") if isinstance(offload, dict) else None
        stage = zero_stage(zero.config)
        if device not in (None, "none") and stage is not None and stage != 3:
            yield diagnostic(
                "DSG407",
                zero.span_of("zero_optimization.offload_param"),
                f"ZeRO config `{zero.name}` offloads parameters at stage {stage}",
                "parameter offload needs `stage = 3`; use `offload_optimizer` at stages 1-2",
            )


def check_offload_optimizer(ctx: Context) -> Iterator[Diagnostic]:
    """DSG420: optimizer offload without a ZeRO optimizer (stage 0), or a partial offload
    (`ratio` below 1, ZeRO-Offload++) below stage 3."""
    for zero in ctx.pipeline.zeros.values():
        offload = zero.config.get("zero_optimization", {}).get("offload_optimizer")
        if not isinstance(offload, dict) or offload.get("device") in (None, "none"):
            continue
        stage = zero_stage(zero.config)
        ratio = offload.get("ratio", 1.0)
        if stage == 0:
            yield diagnostic(
                "DSG420",
                zero.span_of("zero_optimization.offload_optimizer"),
                f"ZeRO config `{zero.name}` offloads the optimizer at stage 0, which has no ZeRO optimizer to offload",
                "use `stage = 1` or more (stage 2 keeps the same memory for the weights), or remove the offload",
            )
        elif isinstance(ratio, (int, float)) and ratio < 1 and stage is not None and stage != 3:
            yield diagnostic(
                "DSG420",
                zero.span_of("zero_optimization.offload_optimizer.ratio"),
                f"ZeRO config `{zero.name}` offloads part of the optimizer (ratio {ratio}) at stage {stage}",
                "a partial offload needs `stage = 3` (DeepSpeed asserts it); use ratio 1 at stages 1-2",
            )


def check_quantized_training(ctx: Context) -> Iterator[Diagnostic]:
    """DSG421: a trained model with 4-bit weights and no LoRA adapter: its packed weights cannot
    be trained, so nothing would be."""
    for train in ctx.pipeline.trains:
        for name, span in zip(train.models, train.model_spans, strict=True):
            model = ctx.pipeline.models.get(name)
            if model is None or model.quantize is None or model.lora is not None or model.frozen:
                continue
            yield diagnostic(
                "DSG421",
                model.spans.get("quantize", model.span),
                f"model `{name}` is trained but its weights are 4-bit, and it has no LoRA adapter to train",
                "add `lora = lora(...)` (QLoRA: only the adapter is trained), or mark the model `frozen`",
                Note(f"`{name}` is trained here", span),
            )


def check_cache(ctx: Context) -> Iterator[Diagnostic]:
    """DSG315-DSG319: `cache` that cannot be done, each for the reason the hoisting stage found."""
    if ctx.hoisting is not None:
        yield from ctx.hoisting.diagnostics


def check_resolved_configs(ctx: Context) -> Iterator[Diagnostic]:
    """DSG405/406/412/413/414: what resolving each model's DeepSpeed config found."""
    if ctx.analysis is None or ctx.configs is None:
        return
    shared_accumulation = ctx.strategy is not None and len(set(ctx.strategy.accelerator_of.values())) > 1
    for name, model in ctx.pipeline.models.items():
        zero = zero_of(ctx.pipeline, model)
        for problem in ctx.configs[name].problems:
            span = _config_span(zero, problem.path) if zero else None
            message = problem.message
            if (
                problem.code == "DSG405"
                and shared_accumulation
                and ctx.strategy is not None
                and ctx.strategy.engine_of(name, ctx.analysis) is Engine.ACCELERATE
            ):
                message += "; Accelerators share one gradient-accumulation state"
            if problem.code == "DSG414" and "precision" in model.spans:
                span = model.spans["precision"]
            if problem.code == "DSG412" and problem.path.startswith("scheduler") and "scheduler" in model.spans:
                span = model.spans["scheduler"]  # the property that asks for the value
            named = not span or f"model `{name}`" in message  # located in the config: say whose
            yield diagnostic(
                problem.code,
                span or model.span,
                message if named else f"{message} (model `{name}`)",
                problem.help,
                *((Note(f"model `{name}` is declared here", model.span),) if span else ()),
            )


def _config_span(zero: ir.ZeroConfig, path: str) -> Span | None:
    """Where the config sets `path`, or else the nearest enclosing key it sets; None if neither."""
    while path:
        if path in zero.key_spans:
            return zero.key_spans[path]
        path = path.rpartition(".")[0]
    return None


CHECKS: tuple[Check, ...] = (
    check_loss_cycles,
    check_something_trained,
    check_train_statements,
    check_unused,
    check_eval_sets,
    check_trained_models_reached,
    check_gradient_groups,
    check_frozen_configs,
    check_shared_groups,
    check_forced_engines,
    check_offload_param,
    check_offload_optimizer,
    check_quantized_training,
    check_cache,
    check_generations,
    check_group_samples,
    check_resolved_configs,
)


def run_checks(ctx: Context) -> list[Diagnostic]:
    return [found for check in CHECKS for found in check(ctx)]
