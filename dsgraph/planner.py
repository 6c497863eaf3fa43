"""The planning stage: the `Plan` (dsgraph.plan) from the checked pipeline and what the earlier
stages decided: the analysis (roles, groups, evaluation order, gradient ownership), the strategy
(engines and Accelerators) and the resolved DeepSpeed configs. Nothing is decided here that the
plan does not show: the setup order, the ops of one training step and the ids that join them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from dsgraph.graph import Graph
from dsgraph import catalogue, ir
from dsgraph import graph as g
from dsgraph import plan as P
from dsgraph.analysis import Analysis, Role
from dsgraph.dsconfig.keys import zero_stage
from dsgraph.dsconfig.resolve import Resolved, precision_of, zero_of
from dsgraph.hoist import Hoisting, Read, chain, fill_bytes, topk_of
from dsgraph.plan import Engine, SourceKind, Width
from dsgraph.strategy import Strategy


def build_plan(
    pipeline: ir.Pipeline,
    graph: Graph,
    analysis: Analysis,
    strategy: Strategy,
    configs: Mapping[str, Resolved],
    hoisting: Hoisting,
    world_size: int | None,
) -> P.Plan:
    models = tuple(
        _model(pipeline, name, analysis, strategy, configs[name])
        for name in pipeline.models
        if analysis.roles[name] is not Role.UNUSED
    )
    trains = {t.index: t for t in pipeline.trains}
    groups = tuple(
        P.Group(
            grp.index,
            grp.loss,
            strategy.groups[grp.index].engine,
            strategy.groups[grp.index].reason,
            trains[grp.index].span,
            strategy.groups[grp.index].forced,
        )
        for grp in analysis.groups
    )
    frozen = (
        P.FrozenEngine(strategy.frozen.engine, strategy.frozen.reason, strategy.frozen.forced)
        if strategy.frozen
        else None
    )
    calls = _call_ids(graph, analysis)
    cache = _Cache({read: _entry_id(read, calls) for reads in hoisting.reads.values() for read in reads})
    data = tuple(pipeline.data.values())
    s = pipeline.settings
    settings = P.Settings(
        s.seed,
        s.steps,
        s.epochs,
        s.micro_batch,
        s.grad_accum,
        s.log_every,
        s.checkpoint_every,
        s.precision,
        s.eval_every,
        s.track,
        s.rank_metrics,
    )
    losses = tuple(
        _loss(loss, calls, cache) for name, loss in pipeline.losses.items() if g.loss_id(name) in analysis.reached
    )
    evaluation, eval_fills = _evaluation(pipeline, graph, analysis, calls, hoisting, cache)
    plan = P.Plan(
        pipeline.name,
        pipeline.file,
        world_size,
        settings,
        data,
        models,
        groups,
        frozen,
        _setup(pipeline, models, engines={m.name: strategy.engine_of(m.name, analysis) for m in models}),
        _training_step(pipeline, graph, analysis, calls, hoisting, cache),
        losses,
        evaluation,
        _precompute(pipeline, graph, calls, hoisting, cache, eval_fills),
        tuple(P.CacheDecision(d.model, d.cached, d.reason, d.span) for d in hoisting.models),
        tuple(
            P.Generation(
                gen.name,
                gen.model,
                gen.data,
                gen.samples,
                gen.max_new_tokens,
                gen.temperature,
                gen.top_p,
                gen.stop,
                gen.gather,
                gen.gather_reason,
                gen.iterations,
                gen.span,
            )
            for gen in pipeline.generations.values()
            if g.generation_id(gen.name) in analysis.reached
        ),
        tuple(
            P.Reward(r.name, r.source, r.span)
            for r in pipeline.rewards.values()
            if any(graph.nodes[n]["reward"] == r.name for n in analysis.in_order(analysis.reached, "reward:"))
        ),
    )
    assert all(gen.gather in ("once", "layers") for gen in plan.generations), "gather = auto is resolved"
    for model in plan.models:  # one home for each value: the config says what resolution decided
        assert model.precision is precision_of(pipeline, pipeline.models[model.name]), model.name
        assert plan.engine_of(model) is strategy.engine_of(model.name, analysis), model.name
    problems = P.lint(plan)
    assert not problems, problems
    return plan


def _model(pipeline: ir.Pipeline, name: str, analysis: Analysis, strategy: Strategy, resolved: Resolved) -> P.Model:
    model = pipeline.models[name]
    zero = zero_of(pipeline, model)
    stage = zero_stage(resolved.config)
    assert stage is not None, f'`{name}`: an "auto" stage is DSG412, reported before planning'
    # 4-bit weights load outside zero.Init (Transformers skips it for quantized models; inside it
    # bitsandbytes cannot unpack them): a quantized ZeRO-3 model is built whole, like zero_init = false.
    built_whole = stage == 3 and (not model.zero_init or model.quantize is not None)
    return P.Model(
        name,
        analysis.group_of_model[name] if analysis.roles[name] is Role.TRAINED else None,
        strategy.accelerator_of.get(name),
        model.source,
        model.zero,
        model.lora,
        _sorted(resolved.config),
        resolved.fills,
        _width(model, stage == 3 and not built_whole, resolved.fills),
        zero.auto if zero else None,
        model.span,
        built_whole,
        model.gradient_checkpointing,
        _client_optimizer(model),
        model.quantize,
        model.train_mode,
    )


def _client_optimizer(model: ir.Model) -> P.Source | None:
    opt = model.optimizer
    if opt is None or opt.factory is None:
        return None
    return P.Source(SourceKind.FACTORY, opt.factory, tuple(sorted(opt.params.items())), opt.span)


def _width(model: ir.Model, partitioned: bool, fills: tuple[P.Fill, ...]) -> Width | None:
    """Where the run learns the width that bucket sizes follow, when a fill needs it: built-ins and
    Hugging Face models say it before they are built; a factory's model is measured once built,
    except under zero.Init, which partitions it as it is built (then DeepSpeed-sized defaults)."""
    if not any(fill.needs_width for fill in fills):
        return None
    if model.source.kind is not SourceKind.FACTORY:
        return Width.SOURCE
    return Width.DEFAULT if partitioned else Width.MODEL


def _sorted(config: dict[str, Any]) -> dict[str, Any]:
    """The config with its keys sorted, at every level: the plan prints it in this order."""
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(config.items())}


# -- setup -------------------------------------------------------------------------------------


def _setup(pipeline: ir.Pipeline, models: tuple[P.Model, ...], engines: dict[str, Engine]) -> tuple[P.SetupStep, ...]:
    """The order Accelerate needs: the first Accelerator holds every plugin (the first trained
    model's first, so it is the default); each model is built and prepared with its own plugin
    selected; the training plugin is selected again before the loop. Native engines follow. Each
    DeepSpeed config is completed once, before anything reads it: a model measured once built is
    built first, before the Accelerator that holds its plugin."""
    steps: list[P.SetupStep] = []
    step_id = iter(range(1, 10**9)).__next__
    accel = [m for m in models if engines[m.name] is Engine.ACCELERATE]
    accel_trained = sorted((m for m in accel if m.trained), key=lambda m: m.accelerator or 0)
    accel_frozen = [m for m in accel if not m.trained]
    native = sorted(
        (m for m in models if engines[m.name] is Engine.DEEPSPEED), key=lambda m: (m.trained, m.group or 0, m.name)
    )
    if not accel:
        steps.append(P.InitProcessGroup(step_id(), pipeline.span))
    for data in pipeline.data.values():
        steps.append(P.BuildData(step_id(), data.name, data.span))
    for m in models:
        if m.width is not Width.MODEL:
            steps.append(P.CompleteConfig(step_id(), m.name, m.span))
    built_first = [m for m in accel if m.width is Width.MODEL]
    for m in built_first:
        steps += [P.BuildModel(step_id(), m.name, m.span), P.CompleteConfig(step_id(), m.name, m.span)]
    if accel:
        plugins = tuple(m.name for m in accel_trained + accel_frozen)
        steps.append(P.CreateAccelerator(step_id(), 0, plugins, accel_trained[0].span))
    for index, m in enumerate(accel_trained):
        if index > 0:
            steps.append(P.CreateAccelerator(step_id(), m.accelerator or 0, (), m.span))
        steps.append(P.SelectPlugin(step_id(), m.name, None, m.span))
        if m not in built_first:
            steps.append(P.BuildModel(step_id(), m.name, m.span))
        steps.append(P.Prepare(step_id(), m.name, m.span))
    for m in accel_frozen:
        steps.append(P.SelectPlugin(step_id(), m.name, None, m.span))
        if m not in built_first:
            steps.append(P.BuildModel(step_id(), m.name, m.span))
        steps.append(P.Prepare(step_id(), m.name, m.span))
    for m in native:
        steps.append(P.BuildModel(step_id(), m.name, m.span))
        if m.width is Width.MODEL:
            steps.append(P.CompleteConfig(step_id(), m.name, m.span))
        steps.append(P.Initialize(step_id(), m.name, m.span))
    # dsgraph deals the batches itself, in the order Accelerate's prepared DataLoader gives: the
    # same for both engine kinds, resumable, and free of Accelerate's end-of-data sync.
    eval_sets = {d.eval for d in pipeline.data.values() if d.eval is not None}
    for data in pipeline.data.values():
        if data.name not in eval_sets:
            steps.append(P.ShardData(step_id(), data.name, data.span))
    for data in pipeline.data.values():
        if data.name in eval_sets:
            steps.append(P.ShardEval(step_id(), data.name, data.span))
    if accel_trained:
        first = accel_trained[0]
        steps.append(P.SelectPlugin(step_id(), first.name, "the training plugin is active during the loop", first.span))
    return tuple(steps)


# -- one training step -------------------------------------------------------------------------


def _call_ids(graph: Graph, analysis: Analysis) -> dict[str, str]:
    """Graph call node -> its id in the plan: `student#1` is the first call of `student` in
    evaluation order. Only calls some train group depends on are made."""
    ids: dict[str, str] = {}
    count: dict[str, int] = {}
    for node in analysis.order:
        if node.startswith("call:") and node in analysis.reached:
            model = graph.nodes[node]["model"]
            count[model] = count.get(model, 0) + 1
            ids[node] = f"{model}#{count[model]}"
    return ids


def _training_step(
    pipeline: ir.Pipeline, graph: Graph, analysis: Analysis, calls: dict[str, str], hoisting: Hoisting, cache: _Cache
) -> tuple[P.StepOp, ...]:
    ops: list[P.StepOp] = []
    op_id = iter(range(1, 10**9)).__next__
    eval_sets = {d.eval for d in pipeline.data.values() if d.eval is not None}
    for data in pipeline.data.values():
        if data.name not in eval_sets:
            ops.append(P.NextBatch(op_id(), data.name, data.span))
    for node, reads in hoisting.reads.items():  # in place of the hoisted calls' forwards
        span = graph.nodes[node]["call"].span
        for read in reads:
            ops.append(P.ReadCache(op_id(), cache.ids[read], hoisting.data[node], span))
    for node in analysis.in_order(analysis.reached, "gen:"):  # on-policy: sampled every micro step
        gen = pipeline.generations[graph.nodes[node]["name"]]
        ops.append(P.Generate(op_id(), gen.name, gen.model, gen.data, gen.span))
    for node in analysis.in_order(analysis.reached, "reward:"):
        call = graph.nodes[node]["call"]
        ops.append(P.ScoreReward(op_id(), ir.show_expr(call), call.reward, call.generation, call.span))
    for node, call_id in calls.items():
        if node in hoisting.reads:
            continue
        call = graph.nodes[node]["call"]
        owners = sorted(analysis.call_groups[node])
        owner = owners[0] if owners else None
        ops.append(
            P.Forward(
                op_id(),
                call_id,
                ir.show_expr(call),
                call.model,
                tuple(_expr(a, calls, cache) for a in call.args),
                tuple((k, _expr(v, calls, cache)) for k, v in call.kwargs),
                owner,
                tuple(calls[d] for d in analysis.detached_inputs(node, owner, graph) if d not in hoisting.reads),
                call.span,
            )
        )
    trains = {t.index: t for t in pipeline.trains}
    for group in analysis.groups:
        detach = tuple(
            sorted(
                calls[c]
                for c in analysis.in_order(group.reach, "call:")
                if analysis.call_groups[c] and group.index not in analysis.call_groups[c]
            )
        )
        for loss in analysis.in_order(group.reach, "loss:"):
            name = graph.nodes[loss]["name"]
            ops.append(P.ComputeLoss(op_id(), name, group.index, detach, pipeline.losses[name].span))
        span = trains[group.index].span
        ops += [P.Backward(op_id(), group.index, span), P.OptimizerStep(op_id(), group.index, span)]
    return tuple(ops)


# -- evaluation --------------------------------------------------------------------------------


def _evaluation(
    pipeline: ir.Pipeline, graph: Graph, analysis: Analysis, calls: dict[str, str], hoisting: Hoisting, cache: _Cache
) -> tuple[P.Evaluation | None, dict[str, str]]:
    """One eval batch: the batches of the eval sets, every call the evaluated losses need (all
    under no_grad; a hoisted call's outputs read from the cache of its eval set), then those
    losses, with every field read from its data set's eval set. A call keeps its training id
    (`student#1` reads `val.x` where training reads `train.x`). Also: each hoisted call the
    evaluation reads -> the eval set its cache must cover."""
    sets = tuple((d.name, d.eval) for d in pipeline.data.values() if d.eval is not None)
    if not sets:
        return None, {}
    held_out = dict(sets)
    loss_nodes = [g.loss_id(name) for name in analysis.evaluated]
    needed = set(loss_nodes).union(*(nx.ancestors(g.dataflow(graph), n) for n in loss_nodes))
    ops: list[P.EvalOp] = []
    op_id = iter(range(1, 10**9)).__next__
    for train, val in sets:
        if g.data_id(train) in needed:
            ops.append(P.NextBatch(op_id(), val, pipeline.data[val].span))
    eval_calls: dict[str, str] = {}
    aliases: dict[str, str] = {}  # the eval call node -> its training node
    fills: dict[str, str] = {}
    for node in analysis.in_order(needed, "call:"):
        call = _held_out(graph.nodes[node]["call"], held_out)
        assert isinstance(call, ir.ModelCall)
        eval_calls[g.call_id(call)] = calls[node]
        aliases[g.call_id(call)] = node
        if node in hoisting.reads:
            fills[node] = held_out[hoisting.data[node]]
            for read in hoisting.reads[node]:
                ops.append(P.ReadCache(op_id(), cache.ids[read], fills[node], call.span))
    eval_cache = dataclasses.replace(cache, aliases=aliases)
    for node in analysis.in_order(needed, "call:"):
        if node in hoisting.reads:
            continue
        call = _held_out(graph.nodes[node]["call"], held_out)
        assert isinstance(call, ir.ModelCall)
        ops.append(
            P.Forward(
                op_id(),
                calls[node],
                ir.show_expr(call),
                call.model,
                tuple(_expr(a, eval_calls, eval_cache) for a in call.args),
                tuple((k, _expr(v, eval_calls, eval_cache)) for k, v in call.kwargs),
                None,
                (),
                call.span,
            )
        )
    losses = []
    for name in analysis.evaluated:
        declared = pipeline.losses[name]
        loss = _loss(ir.Loss(name, _held_out(declared.expr, held_out), declared.span), eval_calls, eval_cache)
        terms = tuple(dataclasses.replace(t, stats=_eval_stats(t.expr)) for t in loss.terms)
        losses.append(dataclasses.replace(loss, terms=terms))
        ops.append(P.EvalLoss(op_id(), name, declared.span))
    return P.Evaluation(sets, tuple(ops), tuple(losses)), fills


# -- the precompute phase ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Cache:
    """The cache entries by what they read; `aliases` maps an eval call to its training call."""

    ids: Mapping[Read, str]
    aliases: Mapping[str, str] = field(default_factory=dict)

    def entry(self, call: ir.ModelCall, path: tuple[str, ...], top: tuple[int, float] | None = None) -> str | None:
        node = g.call_id(call)
        node = self.aliases.get(node, node)
        read = Read(node, path, *top) if top else Read(node, path)
        return self.ids.get(read)


def _entry_id(read: Read, calls: dict[str, str]) -> str:
    """`teacher#1.logits`, or `teacher#1.logits@top16` for its top-16 (`/T2` at temperature 2)."""
    text = calls[read.call] + "".join(f".{p}" for p in read.path)
    if read.topk is not None:
        text += f"@top{read.topk}" + (f"/T{read.temperature:g}" if read.temperature != 1.0 else "")
    return text


def _precompute(
    pipeline: ir.Pipeline,
    graph: Graph,
    calls: dict[str, str],
    hoisting: Hoisting,
    cache: _Cache,
    eval_fills: dict[str, str],
) -> P.Precompute | None:
    """For each cached model, each of its calls over its data set (and over the eval set when
    the evaluation reads it), then the model released."""
    if not hoisting.reads:
        return None
    entries = tuple(
        P.CacheEntry(cache.ids[read], calls[node], read.path, read.topk, read.temperature)
        for node, reads in hoisting.reads.items()
        for read in reads
    )
    steps: list[P.PrecomputeStep] = []
    step_id = iter(range(1, 10**9)).__next__
    for model in pipeline.models:
        nodes = [n for n in hoisting.reads if graph.nodes[n]["model"] == model]
        if not nodes:
            continue
        for node in nodes:
            call: ir.ModelCall = graph.nodes[node]["call"]
            train = hoisting.data[node]
            for data in filter(None, (train, eval_fills.get(node))):
                read_call = _held_out(call, {train: data}) if data != train else call
                assert isinstance(read_call, ir.ModelCall)
                reads = hoisting.reads[node]
                rows = hoisting.rows.get(data)
                steps.append(
                    P.FillCache(
                        step_id(),
                        calls[node],
                        ir.show_expr(read_call),
                        model,
                        data,
                        tuple(_expr(a, calls) for a in read_call.args),
                        tuple((k, _expr(v, calls)) for k, v in read_call.kwargs),
                        tuple(cache.ids[r] for r in reads),
                        rows,
                        fill_bytes(reads, rows, hoisting.row_bytes),
                        call.span,
                    )
                )
        steps.append(P.ReleaseModel(step_id(), model, pipeline.models[model].span))
    return P.Precompute(pipeline.settings.cache_dir, entries, tuple(steps))


def _held_out(expr: ir.LossExpr, held_out: dict[str, str]) -> ir.LossExpr:
    """The expression with every field read from its data set's eval set."""
    match expr:
        case ir.FieldRef(data=data) if data in held_out:
            return dataclasses.replace(expr, data=held_out[data])
        case ir.Project(obj=obj):
            return dataclasses.replace(expr, obj=_held_out(obj, held_out))
        case ir.Neg(operand=operand):
            return dataclasses.replace(expr, operand=_held_out(operand, held_out))
        case ir.BinOp(left=left, right=right):
            return dataclasses.replace(expr, left=_held_out(left, held_out), right=_held_out(right, held_out))
        case ir.ModelCall(args=args, kwargs=kwargs) | ir.LossFn(args=args, kwargs=kwargs):
            return dataclasses.replace(
                expr,
                args=tuple(_held_out(a, held_out) for a in args),
                kwargs=tuple((k, _held_out(v, held_out)) for k, v in kwargs),
            )
    return expr


def _eval_stats(expr: P.Expr) -> tuple[str, ...]:
    if isinstance(expr, P.LossCall) and expr.builtin:
        options = {k: v.value for k, v in expr.kwargs if isinstance(v, P.Const)}
        return catalogue.eval_stats(expr.fn, options)
    return ()


def _expr(expr: ir.LossExpr, calls: dict[str, str], cache: _Cache | None = None) -> P.Expr:
    """An IR expression as the plan's: model calls by their id, a hoisted call's output (or the
    teacher of `kl(..., topk=K)`) by its cache entry."""
    if cache is not None and cache.ids:
        found = chain(expr)
        entry = cache.entry(*found) if found else None
        if entry is not None:
            return P.Cached(entry, expr.span)

    def sub(x: ir.LossExpr) -> P.Expr:
        return _expr(x, calls, cache)

    match expr:
        case ir.Const(value=v, span=s):
            return P.Const(v, s)
        case ir.FieldRef(data=d, field=f, span=s):
            return P.Field(d, f, s)
        case ir.ModelCall(span=s):
            return P.CallOutput(calls[g.call_id(expr)], s)
        case ir.Project(obj=o, attr=a, span=s):
            return P.Attr(sub(o), a, s)
        case ir.LossFn(fn=fn, builtin=b, args=a, kwargs=k, span=s):
            args = [sub(x) for x in a]
            top = topk_of(expr)
            teacher = chain(a[1]) if top is not None and len(a) > 1 else None
            entry = cache.entry(teacher[0], teacher[1], top) if cache is not None and teacher else None
            if entry is not None:  # the teacher's top-k, precomputed
                args[1] = P.Cached(entry, a[1].span)
            return P.LossCall(fn, b, tuple(args), tuple((n, sub(x)) for n, x in k), s)
        case ir.LossRef(name=n, span=s):
            return P.LossValue(n, s)
        case ir.Generated(generation=gen, field=f, span=s):
            return P.Generated(gen, f, s)
        case ir.RewardCall(span=s):
            return P.RewardValue(ir.show_expr(expr), s)
        case ir.BinOp(op=op, left=left, right=right, span=s):
            return P.BinOp(op, sub(left), sub(right), s)
        case ir.Neg(operand=o, span=s):
            return P.Neg(sub(o), s)
    raise TypeError(f"not a loss expression: {expr!r}")


def _loss(loss: ir.Loss, calls: dict[str, str], cache: _Cache | None = None) -> P.Loss:
    """The loss as the weighted sum of its terms, each named for the metrics (`kd/kl`, `kd/ce`)."""
    terms: list[P.Term] = []
    seen: dict[str, int] = {}
    for term in g.split_terms(loss.expr):
        match term.expr:
            case ir.LossFn(fn=fn):
                short = fn.rpartition(":")[2]
            case ir.LossRef(name=n):
                short = n
            case _:
                short = "term"
        seen[short] = seen.get(short, 0) + 1
        name = short if seen[short] == 1 else f"{short}#{seen[short]}"
        stats = catalogue.LOSSES[term.expr.fn].stats if isinstance(term.expr, ir.LossFn) and term.expr.builtin else ()
        terms.append(
            P.Term(
                f"{loss.name}/{name}",
                float(term.weight),
                _expr(term.expr, calls, cache),
                ir.show_expr(term.expr),
                stats,
            )
        )
    return P.Loss(loss.name, ir.show_expr(loss.expr), tuple(terms), loss.span)
