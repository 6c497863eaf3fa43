"""The plan's own consistency, checked where it is made (the planner) and where it is read (every
worker): what each step refers to exists and comes before it, so that the executor, which runs
the steps in order, never meets a model it has not built or a value nobody computed."""

from __future__ import annotations

from dsgraph.plan.schema import Engine, Plan, Width
from dsgraph.plan.steps import (
    Attr,
    Backward,
    BinOp,
    BuildData,
    BuildModel,
    Cached,
    CallOutput,
    CompleteConfig,
    ComputeLoss,
    Const,
    CreateAccelerator,
    EvalLoss,
    Expr,
    Field,
    FillCache,
    Forward,
    Generate,
    Generated,
    Initialize,
    InitProcessGroup,
    LossCall,
    LossValue,
    Neg,
    NextBatch,
    OptimizerStep,
    Prepare,
    ReadCache,
    ReleaseModel,
    RewardValue,
    ScoreReward,
    SelectPlugin,
    ShardData,
    ShardEval,
)


def lint(plan: Plan) -> list[str]:
    """What is wrong with the plan, in words; empty when nothing is."""
    return _declarations(plan) + _setup(plan) + _precompute(plan) + _step(plan) + _evaluation(plan)


def _declarations(plan: Plan) -> list[str]:
    out = []
    for kind, names in (
        ("model", [m.name for m in plan.models]),
        ("data set", [d.name for d in plan.data]),
        ("loss", [loss.name for loss in plan.losses]),
        ("group", [g.index for g in plan.groups]),
    ):
        if len(set(names)) != len(names):
            out.append(f"a {kind} is declared twice")
    groups = {g.index for g in plan.groups}
    for m in plan.models:
        if m.group is not None and m.group not in groups:
            out.append(f"model `{m.name}` is in group {m.group}, which does not exist")
        if m.group is None and plan.frozen is None:
            out.append(f"frozen model `{m.name}`, but the plan says how no frozen model runs")
        if (m.accelerator is not None) != (plan.engine_of(m) is Engine.ACCELERATE):
            out.append(f"model `{m.name}` has an Accelerator exactly when it runs on Accelerate")
        for fill in m.fills:
            *parents, leaf = fill.value.split(".")
            node = m.deepspeed_config
            for part in parents:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if not isinstance(node, dict) or node.get(leaf) != "auto":
                out.append(f'model `{m.name}`: `{fill.value}` is to be filled but is not "auto"')
        if (m.width is not None) != any(f.needs_width for f in m.fills):
            out.append(f"model `{m.name}`: a width source exactly when a fill needs the width")
    for g in plan.groups:
        if not plan.models_of(g.index):
            out.append(f"group {g.index} trains no model")
    data_names = {d.name for d in plan.data}
    evals = [d.eval for d in plan.data if d.eval is not None]
    out += [f"eval set `{e}` is not a data set" for e in evals if e not in data_names]
    if len(set(evals)) != len(evals):
        out.append("an eval set serves two data sets")
    out += [f"data set `{d.name}` is both an eval set and has one" for d in plan.data if d.eval and d.name in evals]
    if (plan.evaluation is None) != (not evals):
        out.append("an evaluation exactly when some data set has an eval set")
    return out


def _setup(plan: Plan) -> list[str]:
    out: list[str] = []
    ids = [s.id for s in plan.setup]
    if ids != sorted(set(ids)):
        out.append("setup step ids are not increasing")
    built_data: set[str] = set()
    completed: set[str] = set()
    built: set[str] = set()
    engines: set[str] = set()
    accelerators: set[int] = set()
    grouped = any(m.accelerator is not None for m in plan.models)
    for step in plan.setup:
        where = f"setup step {step.id} ({step.kind})"
        match step:
            case InitProcessGroup():
                if grouped:
                    out.append(f"{where}: the first Accelerator creates the process group")
            case BuildData(data=name):
                built_data.add(name)
            case ShardData(data=name) | ShardEval(data=name) if name not in built_data:
                out.append(f"{where}: data set `{name}` is not built yet")
            case CompleteConfig(model=name):
                if plan.model(name).width is Width.MODEL and name not in built:
                    out.append(f"{where}: `{name}` is measured once built, and is not built yet")
                completed.add(name)
            case CreateAccelerator(accelerator=index, plugins=plugins):
                out += [f"{where}: the config of `{p}` is not complete yet" for p in plugins if p not in completed]
                accelerators.add(index)
            case SelectPlugin(model=name) | Prepare(model=name) if 0 not in accelerators:
                out.append(f"{where}: `{name}`'s plugin is in Accelerator 0, which does not exist yet")
            case BuildModel(model=name):
                if plan.model(name).zero_init and name not in completed:
                    out.append(f"{where}: `{name}` is built under zero.Init before its config is complete")
                built.add(name)
            case Prepare(model=name) | Initialize(model=name):
                if name not in built or name not in completed:
                    out.append(f"{where}: `{name}` is not built, or its config not complete, yet")
                engines.add(name)
    if not grouped and not any(isinstance(s, InitProcessGroup) for s in plan.setup):
        out.append("no Accelerator and no process group: nothing starts torch.distributed")
    missing = {m.name for m in plan.models} - engines
    out += [f"model `{name}` gets no engine in the setup" for name in sorted(missing)]
    out += [f"data set `{d.name}` is not built in the setup" for d in plan.data if d.name not in built_data]
    return out


class _Reads:
    """What the ops of one step have made so far, and the reads of what they have not."""

    def __init__(self, out: list[str]):
        self.out = out
        self.batches: set[str] = set()
        self.calls: set[str] = set()
        self.losses: set[str] = set()
        self.cached: set[str] = set()
        self.generated: set[str] = set()
        self.rewards: set[str] = set()

    def check(self, expr: Expr, where: str) -> None:
        out, batches, calls, losses, refs = self.out, self.batches, self.calls, self.losses, self.check
        match expr:
            case Field(data=data) if data not in batches:
                out.append(f"{where}: reads data set `{data}` before its batch")
            case CallOutput(call=call) if call not in calls:
                out.append(f"{where}: reads `{call}` before it is called")
            case LossValue(loss=loss) if loss not in losses:
                out.append(f"{where}: reads loss `{loss}` before its group computes it")
            case Cached(entry=entry) if entry not in self.cached:
                out.append(f"{where}: reads cache entry `{entry}` before a read_cache op")
            case Generated(generation=gen) if gen not in self.generated:
                out.append(f"{where}: reads generation `{gen}` before it is generated")
            case RewardValue(call=call) if call not in self.rewards:
                out.append(f"{where}: reads reward `{call}` before it is computed")
            case Attr(of=inner) | Neg(operand=inner):
                refs(inner, where)
            case BinOp(left=left, right=right):
                refs(left, where)
                refs(right, where)
            case LossCall(args=args, kwargs=kwargs):
                for arg in (*args, *(v for _, v in kwargs)):
                    refs(arg, where)
            case Const() | Field() | CallOutput() | LossValue() | Cached() | Generated() | RewardValue():
                pass

    def read_cache(self, op: ReadCache, plan: Plan, filled: set[tuple[str, str]], where: str) -> None:
        """A cache read: of an entry the precompute phase fills for this data set, after its batch."""
        if op.data not in self.batches:
            self.out.append(f"{where}: reads the cache rows of `{op.data}` before its batch")
        entry = next((e for e in plan.precompute.entries if e.id == op.entry), None) if plan.precompute else None
        if entry is None or (entry.call, op.data) not in filled:
            self.out.append(f"{where}: cache entry `{op.entry}` is not filled over `{op.data}`")
        self.cached.add(op.entry)

    def forward(self, op: Forward, where: str) -> None:
        for arg in (*op.args, *(v for _, v in op.kwargs)):
            self.check(arg, where)
        if op.call in self.calls:
            self.out.append(f"{where}: `{op.call}` is called twice")
        self.calls.add(op.call)


def _step(plan: Plan) -> list[str]:
    out: list[str] = []
    reads = _Reads(out)
    losses = reads.losses
    backward: set[int] = set()
    stepped: set[int] = set()
    filled = _filled(plan)
    released = set(plan.precompute.released) if plan.precompute else set()
    for op in plan.step:
        where = f"op {op.id} ({op.kind})"
        match op:
            case NextBatch(data=name):
                reads.batches.add(name)
            case ReadCache():
                reads.read_cache(op, plan, filled, where)
            case Generate(generation=name, model=model, data=data):
                gen = next((g for g in plan.generations if g.name == name), None)
                if gen is None or (gen.model, gen.data) != (model, data):
                    out.append(f"{where}: `{name}` is not a generation of `{model}` over `{data}`")
                if model not in {m.name for m in plan.models} or model in released:
                    out.append(f"{where}: `{model}` is not a model of the loop")
                if data not in reads.batches:
                    out.append(f"{where}: generates from `{data}` before its batch")
                reads.generated.add(name)
            case ScoreReward(call=call, reward=reward, generation=gen):
                if reward not in {r.name for r in plan.rewards}:
                    out.append(f"{where}: `{reward}` is not a reward of the plan")
                if gen not in reads.generated:
                    out.append(f"{where}: scores generation `{gen}` before it is generated")
                reads.rewards.add(call)
            case Forward():
                if op.model in released:
                    out.append(f"{where}: `{op.model}` is released before the loop")
                reads.forward(op, where)
            case ComputeLoss(loss=name):
                for term in plan.loss(name).terms:
                    reads.check(term.expr, where)
                losses.add(name)
            case Backward(group=group):
                if plan.group(group).loss not in losses:
                    out.append(f"{where}: group {group}'s loss is not computed before its backward")
                backward.add(group)
                losses.clear()  # a group's losses are spent by its backward
            case OptimizerStep(group=group):
                if group not in backward:
                    out.append(f"{where}: group {group} steps before its backward")
                stepped.add(group)
    for g in plan.groups:
        if g.index not in stepped:
            out.append(f"group {g.index} has no optimizer step")
    return out


def _evaluation(plan: Plan) -> list[str]:
    if plan.evaluation is None:
        return []
    out: list[str] = []
    evals = {d.eval for d in plan.data if d.eval is not None}
    sharded = {s.data for s in plan.setup if isinstance(s, ShardEval)}
    out += [f"eval set `{name}` is not sharded in the setup" for name in sorted(evals - sharded)]
    reads = _Reads(out)
    names = {loss.name for loss in plan.evaluation.losses}
    for op in plan.evaluation.step:
        where = f"eval op {op.id} ({op.kind})"
        match op:
            case NextBatch(data=name):
                if name not in evals:
                    out.append(f"{where}: `{name}` is not an eval set")
                reads.batches.add(name)
            case ReadCache():
                reads.read_cache(op, plan, _filled(plan), where)
            case Forward():
                if plan.precompute and op.model in plan.precompute.released:
                    out.append(f"{where}: `{op.model}` is released before the loop")
                if not op.no_grad:
                    out.append(f"{where}: an eval forward with gradients")
                reads.forward(op, where)
            case EvalLoss(loss=name):
                if name not in names:
                    out.append(f"{where}: loss `{name}` is not evaluated")
                    continue
                for term in plan.evaluation.loss(name).terms:
                    reads.check(term.expr, where)
                reads.losses.add(name)
    return out


def _filled(plan: Plan) -> set[tuple[str, str]]:
    """(call, data set) of every fill of the precompute phase."""
    if plan.precompute is None:
        return set()
    return {(s.call, s.data) for s in plan.precompute.steps if isinstance(s, FillCache)}


def _precompute(plan: Plan) -> list[str]:
    """Each fill runs a frozen model (not released yet) over a data set, writing declared entries
    of its own call; each cached model is released once, after its fills."""
    if plan.precompute is None:
        return []
    out: list[str] = []
    entries = {e.id: e for e in plan.precompute.entries}
    names = {d.name for d in plan.data}
    released: set[str] = set()
    for step in plan.precompute.steps:
        where = f"precompute step {step.id} ({step.kind})"
        match step:
            case FillCache(model=model, data=data, call=call):
                if model not in {m.name for m in plan.models} or plan.model(model).trained:
                    out.append(f"{where}: `{model}` is not a frozen model of the plan")
                if model in released:
                    out.append(f"{where}: `{model}` is released already")
                if data not in names:
                    out.append(f"{where}: `{data}` is not a data set")
                for arg in (*step.args, *(v for _, v in step.kwargs)):
                    if not _fields_of(arg, data):
                        out.append(f"{where}: an argument reads something else than `{data}`'s fields")
                for entry in step.entries:
                    if entry not in entries or entries[entry].call != call:
                        out.append(f"{where}: entry `{entry}` is not an entry of `{call}`")
            case ReleaseModel(model=model):
                if model in released:
                    out.append(f"{where}: `{model}` is released twice")
                released.add(model)
    return out


def _fields_of(expr: Expr, data: str) -> bool:
    match expr:
        case Field(data=name):
            return name == data
        case Const():
            return True
        case Attr(of=inner) | Neg(operand=inner):
            return _fields_of(inner, data)
        case BinOp(left=left, right=right):
            return _fields_of(left, data) and _fields_of(right, data)
    return False
