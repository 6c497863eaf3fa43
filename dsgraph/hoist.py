"""The hoisting stage: which frozen models' calls are loop-invariant, and which are cached.

A frozen model's call computes the same output for the same sample every time when its arguments
are fields of one data set that gives the same sample for the same index (the built-ins, JSONL
files, `datasets` splits; a factory's data or a collate function only when declared
`deterministic = true`) and the model runs in eval mode. Such a call can be computed once per
sample before the loop (the plan's precompute phase), its outputs cached on disk by sample index,
and the model released for the training that follows.

`cache = true` asks for it (each reason it cannot be done is an error at the `cache` line),
`cache = auto` takes it when it pays (the run passes over the data more than once) and the cache
fits `cache_budget`, `cache = false` (the default) keeps the model in the loop. What is read from
the cache is the projection the losses read (`teacher(x).logits`), whole, or for `kl(...,
topk=K)` the K largest teacher log-probabilities at each position."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from dsgraph import cachesize, ir
from dsgraph import graph as g
from dsgraph.analysis import Analysis, Role
from dsgraph.diagnostics import Diagnostic, Note, diagnostic
from dsgraph.dsconfig.resolve import precision_of
from dsgraph.dsconfig.sizes import human
from dsgraph.graph import Graph
from dsgraph.plan import DataSet, SourceKind
from dsgraph.source import Span

GIB = 2**30


@dataclass(frozen=True)
class Read:
    """What the loop reads of a cached call: its output at `path`, whole or as top-k."""

    call: str  # the graph's call node
    path: tuple[str, ...]
    topk: int | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a call cannot be cached: the code, the fact, the fix, and where it is seen."""

    code: str
    why: str
    help: str
    span: Span
    where: str  # what `span` shows, for the note


@dataclass(frozen=True)
class ModelCache:
    """The decision for one frozen model with a `cache` setting."""

    model: str
    cached: bool
    reason: str  # why, in words (printed in the plan)
    span: Span  # the `cache` entry


@dataclass(frozen=True)
class Hoisting:
    data: Mapping[str, str]  # hoistable call node -> the data set its arguments read
    refusals: Mapping[str, Refusal]  # call node -> why it is not hoistable
    reads: Mapping[str, tuple[Read, ...]]  # cached call node -> what the loop reads of it
    models: tuple[ModelCache, ...]
    rows: Mapping[str, int | None]  # data set -> its samples, where known before the run
    row_bytes: Mapping[Read, int | None]  # bytes of one cached row of a read
    diagnostics: tuple[Diagnostic, ...]
    calls: tuple[str, ...] = ()  # every reached call of a frozen model, in evaluation order

    def show(self, graph: Graph) -> str:
        """`--emit hoist`: each frozen call, loop-invariant or why not; each `cache` decision; what
        is read of each cached call."""
        out = ["hoist"]
        for node in self.calls:
            text = ir.show_expr(graph.nodes[node]["call"])
            if node in self.data:
                out.append(f"  call {text}: loop-invariant over `{self.data[node]}`")
            else:
                out.append(f"  call {text}: not loop-invariant: {self.refusals[node].why}")
        for m in self.models:
            out.append(f"  model {m.model}: {'cached' if m.cached else 'not cached'} ({m.reason})")
        for node, reads in self.reads.items():
            for r in reads:
                kept = "whole" if r.topk is None else f"top-{r.topk} at temperature {r.temperature:g}"
                out.append(
                    f"  read {ir.show_expr(graph.nodes[node]['call'])}{''.join('.' + p for p in r.path)}: {kept}"
                )
        return "\n".join(out) + "\n"


def hoist(pipeline: ir.Pipeline, graph: Graph, analysis: Analysis, world_size: int | None) -> Hoisting:
    """The stage: every reached call of a frozen model, hoistable or why not; for each model with
    `cache = true | auto`, the decision."""
    base = Path(pipeline.file).parent
    data: dict[str, str] = {}
    refusals: dict[str, Refusal] = {}
    calls_of: dict[str, list[str]] = {}
    for node in analysis.in_order(analysis.reached, "call:"):
        model = graph.nodes[node]["model"]
        if analysis.roles.get(model) is not Role.FROZEN or model not in pipeline.models:
            continue
        calls_of.setdefault(model, []).append(node)
        outcome = _hoistable(pipeline, graph.nodes[node]["call"])
        if isinstance(outcome, Refusal):
            refusals[node] = outcome
        else:
            data[node] = outcome
    reads = _reads(pipeline, analysis, frozenset(data))
    rows = {name: cachesize.data_rows(d, base) for name, d in pipeline.data.items()}
    sizes: dict[Read, int | None] = {}
    for node, node_reads in reads.items():
        model = pipeline.models[graph.nodes[node]["model"]]
        for read in node_reads:
            shape = cachesize.output_shape(model, pipeline.data[data[node]], read.path, base)
            precision = precision_of(pipeline, model)
            sizes[read] = cachesize.row_bytes(shape, precision, read.topk) if shape else None
    models: list[ModelCache] = []
    diags: list[Diagnostic] = []
    budget = pipeline.settings.cache_budget * GIB
    for name, model in pipeline.models.items():
        if model.cache == "false":
            continue
        span = model.spans["cache"]
        if not model.frozen:
            what = "trained" if analysis.roles.get(name) is Role.TRAINED else "not declared frozen"
            diags.append(
                diagnostic(
                    "DSG315",
                    span,
                    f"`{name}` is {what}: only a frozen model's outputs stay the same from step to step",
                    "remove `cache`, or declare the model `frozen`",
                )
            )
            continue
        if analysis.roles.get(name) is not Role.FROZEN:  # unused: DSG310 says so
            continue
        nodes = calls_of.get(name, [])
        refused = [n for n in nodes if n in refusals]
        if model.cache == "true":
            for node in refused:
                r = refusals[node]
                call = graph.nodes[node]["call"]
                diags.append(
                    diagnostic(
                        r.code,
                        span,
                        f"`{name}` cannot be cached: `{ir.show_expr(call)}` {r.why}",
                        r.help,
                        Note(r.where, r.span),
                    )
                )
            if not refused:
                models.append(ModelCache(name, True, "cache = true", span))
            continue
        # cache = auto
        if refused:
            r = refusals[refused[0]]
            models.append(ModelCache(name, False, f"not loop-invariant: {r.why}", span))
            continue
        total = _cache_bytes(nodes, data, reads, rows, sizes, pipeline)
        epochs = _epochs(pipeline, [data[n] for n in nodes], rows, world_size)
        if total is None or epochs is None:
            models.append(ModelCache(name, False, "its size is known only at run time: write `cache = true`", span))
        elif epochs <= 1:
            at = "" if world_size else " at world size 1 (compile with --world-size N to plan for N processes)"
            why = f"the run reads each sample {epochs:.2g} times{at}: nothing to save"
            models.append(ModelCache(name, False, why, span))
        elif total > budget:
            models.append(
                ModelCache(
                    name,
                    False,
                    f"{human(total)} exceed `cache_budget = {pipeline.settings.cache_budget:g}` (GiB)",
                    span,
                )
            )
        else:
            budget -= total
            models.append(ModelCache(name, True, f"{epochs:.3g} passes over the data; {human(total)}", span))
    cached = {m.model for m in models if m.cached}
    kept = {n: r for n, r in reads.items() if graph.nodes[n]["model"] in cached}
    calls = tuple(n for nodes in calls_of.values() for n in nodes)
    calls = tuple(sorted(calls, key=analysis.position.__getitem__))
    return Hoisting(data, refusals, kept, tuple(models), rows, sizes, tuple(diags), calls)


def _hoistable(pipeline: ir.Pipeline, call: ir.ModelCall) -> str | Refusal:
    """The data set a call's arguments read, or why its output may change between two calls on
    the same sample."""
    model = pipeline.models[call.model]
    if model.train_mode:
        return Refusal(
            "DSG318",
            "runs in train mode: its dropout draws new masks on every call",
            f"remove `train_mode` from `{call.model}` to cache it, or `cache` to keep it in the loop",
            model.spans.get("train_mode", model.span),
            "`train_mode` is set here",
        )
    fields: list[ir.FieldRef] = []
    for arg in [*call.args, *(v for _, v in call.kwargs)]:
        generated = _generated(arg)
        if generated is not None:
            return Refusal(
                "DSG320",
                f"reads `{ir.show_expr(generated)}`, sampled anew at every step: it is on-policy",
                "a call on generated data runs every step; remove `cache`",
                generated.span,
                "the generated data it reads",
            )
        inner = _model_input(arg)
        if inner is not None:
            return Refusal(
                "DSG316",
                f"reads the output of `{ir.show_expr(inner)}`, which is not a data field",
                "only a call on data fields is computed once per sample; remove `cache`",
                inner.span,
                "the model output it reads",
            )
        fields += _fields(arg)
    sets = sorted({f.data for f in fields})
    if len(sets) != 1:
        return Refusal(
            "DSG319",
            f"reads {'no data set' if not sets else 'the data sets ' + ', '.join(f'`{s}`' for s in sets)}: "
            "a cached row belongs to one sample of one data set",
            "cache a call whose arguments are fields of one data set, or remove `cache`",
            call.span,
            "the call",
        )
    for name in (sets[0], pipeline.data[sets[0]].eval):
        if name is None or name not in pipeline.data:  # an undeclared eval set: DSG201 says so
            continue
        why = _nondeterministic(pipeline.data[name])
        if why is not None:
            return Refusal(
                "DSG317",
                f"reads `{name}`, {why}",
                f"write `deterministic = true` in the block of `{name}` if it gives the same sample for the same "
                "index every time, or remove `cache`",
                pipeline.data[name].span,
                f"`{name}` is declared here",
            )
    return sets[0]


def _nondeterministic(data: DataSet) -> str | None:
    if data.deterministic is True:
        return None
    if data.deterministic is False:
        return "declared `deterministic = false`"
    if data.source.kind is SourceKind.FACTORY:
        return "a factory's data set, which may differ for the same index (random crops, augmentations)"
    if data.collate is not None:
        return "whose collate function may be random (masking, cropping)"
    return None


def _generated(expr: ir.LossExpr) -> ir.Generated | None:
    match expr:
        case ir.Generated():
            return expr
        case ir.Project(obj=obj) | ir.Neg(operand=obj):
            return _generated(obj)
        case ir.BinOp(left=left, right=right):
            return _generated(left) or _generated(right)
        case ir.ModelCall(args=args, kwargs=kwargs):
            return next(filter(None, (_generated(a) for a in (*args, *(v for _, v in kwargs)))), None)
    return None


def _model_input(expr: ir.LossExpr) -> ir.ModelCall | None:
    match expr:
        case ir.ModelCall():
            return expr
        case ir.Project(obj=obj):
            return _model_input(obj)
        case ir.BinOp(left=left, right=right):
            return _model_input(left) or _model_input(right)
        case ir.Neg(operand=operand):
            return _model_input(operand)
    return None


def _fields(expr: ir.LossExpr) -> list[ir.FieldRef]:
    match expr:
        case ir.FieldRef():
            return [expr]
        case ir.Project(obj=obj):
            return _fields(obj)
        case ir.BinOp(left=left, right=right):
            return _fields(left) + _fields(right)
        case ir.Neg(operand=operand):
            return _fields(operand)
    return []


# -- what the loop reads of a cached call ----------------------------------------------------


def chain(expr: ir.LossExpr) -> tuple[ir.ModelCall, tuple[str, ...]] | None:
    """`teacher(x).logits` -> (the call, ("logits",)); None when not a call's projection."""
    path: list[str] = []
    while isinstance(expr, ir.Project):
        path.append(expr.attr)
        expr = expr.obj
    return (expr, tuple(reversed(path))) if isinstance(expr, ir.ModelCall) else None


def topk_of(fn: ir.LossFn) -> tuple[int, float] | None:
    """`kl(..., topk=K, temperature=T)`: (K, T)."""
    if not (fn.builtin and fn.fn == "kl"):
        return None
    options = {k: v.value for k, v in fn.kwargs if isinstance(v, ir.Const)}
    topk = options.get("topk")
    return (int(topk), float(options.get("temperature", 1.0))) if isinstance(topk, int) else None


def find_reads(expr: ir.LossExpr, hoisted: Callable[[str], bool]) -> Iterator[Read]:
    """Each place `expr` reads a hoisted call's output, outermost first: a projection chain over
    the call (`teacher(x).logits`), or the teacher argument of `kl(..., topk=K)` (its top-K)."""
    found = chain(expr)
    if found is not None and hoisted(g.call_id(found[0])):
        yield Read(g.call_id(found[0]), found[1])
        return
    match expr:
        case ir.LossFn(args=args, kwargs=kwargs):
            top = topk_of(expr)
            for index, arg in enumerate(args):
                inner = chain(arg)
                if top is not None and index == 1 and inner is not None and hoisted(g.call_id(inner[0])):
                    yield Read(g.call_id(inner[0]), inner[1], top[0], top[1])
                else:
                    yield from find_reads(arg, hoisted)
            for _, value in kwargs:
                yield from find_reads(value, hoisted)
        case ir.ModelCall(args=args, kwargs=kwargs):
            for arg in [*args, *(v for _, v in kwargs)]:
                yield from find_reads(arg, hoisted)
        case ir.Project(obj=obj):
            yield from find_reads(obj, hoisted)
        case ir.BinOp(left=left, right=right):
            yield from find_reads(left, hoisted)
            yield from find_reads(right, hoisted)
        case ir.Neg(operand=operand):
            yield from find_reads(operand, hoisted)


def _reads(pipeline: ir.Pipeline, analysis: Analysis, hoistable: frozenset[str]) -> dict[str, tuple[Read, ...]]:
    """Every read of every hoistable call, in the reached losses and the arguments of the calls."""
    found: dict[str, list[Read]] = {}
    exprs: list[ir.LossExpr] = [
        loss.expr for name, loss in pipeline.losses.items() if g.loss_id(name) in analysis.reached
    ]
    for loss in exprs:
        for read in find_reads(loss, hoistable.__contains__):
            if read not in found.setdefault(read.call, []):
                found[read.call].append(read)
    return {node: tuple(reads) for node, reads in found.items()}


def fill_bytes(reads: tuple[Read, ...], rows: int | None, sizes: Mapping[Read, int | None]) -> int | None:
    """The bytes of one fill: its rows times the bytes of a row of each read (None: unknown)."""
    per_row = [sizes.get(r) for r in reads]
    if rows is None or any(b is None for b in per_row):
        return None
    return rows * sum(b for b in per_row if b is not None)


def _cache_bytes(
    nodes: list[str],
    data: Mapping[str, str],
    reads: Mapping[str, tuple[Read, ...]],
    rows: Mapping[str, int | None],
    sizes: Mapping[Read, int | None],
    pipeline: ir.Pipeline,
) -> int | None:
    """The bytes of a model's cache: every call's fills, over its data set and its eval set."""
    total = 0
    for node in nodes:
        for name in filter(None, (data[node], pipeline.data[data[node]].eval)):
            size = fill_bytes(reads.get(node, ()), rows.get(name), sizes)
            if size is None:
                return None
            total += size
    return total


def _epochs(
    pipeline: ir.Pipeline, sets: list[str], rows: Mapping[str, int | None], world_size: int | None
) -> float | None:
    """How many times the run reads each sample of the smallest of these data sets."""
    s = pipeline.settings
    if s.epochs is not None:
        return float(s.epochs)
    counts = [rows.get(name) for name in sets]
    if not counts or any(c is None for c in counts):
        return None
    samples = (s.steps or 0) * s.micro_batch * s.grad_accum * (world_size or 1)
    return samples / min(c for c in counts if c is not None)
