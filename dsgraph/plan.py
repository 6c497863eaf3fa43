"""The Plan: what the runtime executes, in order, with the full DeepSpeed config of every model.

`setup` builds the engines (plugin selection, model building, prepare / initialize, data);
`step` is one training step (forwards, then per group: losses, backward, optimizer step). Every
entry keeps the span of the .dsg line it comes from. `to_json()` is the form the runtime loads."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dsgraph import catalogue, ir
from dsgraph.analysis import Role
from dsgraph.checks import Context
from dsgraph.dsconfig import precision_of, stage_of, zero_of
from dsgraph.graph import split_terms
from dsgraph.strategy import Engine

PLAN_VERSION = 1


@dataclass(frozen=True)
class Plan:
    data: dict[str, Any]        # the JSON form; text and DOT are rendered from it

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False) + "\n"

    @property
    def digest(self) -> str:
        return self.data["digest"]


def _step(op: str, span, **fields) -> dict[str, Any]:
    return {"op": op, **fields, "span": span.to_json()}


def build_plan(ctx: Context) -> Plan:
    p, analysis, strategy = ctx.pipeline, ctx.analysis, ctx.strategy
    assert analysis is not None and strategy is not None
    models = []
    for name, model in p.models.items():
        role = analysis.roles[name]
        if role is Role.UNUSED:
            continue
        resolved = ctx.resolved[name]
        engine = strategy.engine_of(name, analysis)
        models.append({
            "name": name, "role": role.value,
            "group": analysis.group_of_model.get(name) if role is Role.TRAINED else None,
            "engine": engine.value, "accelerator": strategy.accelerator_of.get(name),
            "stage": stage_of(p, model), "precision": precision_of(p, model).value,
            "zero_init": stage_of(p, model) == 3, "source": model.source.to_json(),
            "zero": model.zero, "lora": model.lora.params if model.lora else None,
            "deepspeed_config": _sorted(resolved.config),
            "runtime_auto": dict(sorted(resolved.runtime.items())), "span": model.span.to_json(),
        })
        if zero_of(p, model) is not None and zero_of(p, model).auto:    # `zero = auto`: why this stage
            models[-1]["zero_auto"] = zero_of(p, model).auto
    groups = []
    trains = {t.index: t for t in p.trains}
    for group in analysis.groups:
        train = trains[group.index]
        decision = strategy.groups[group.index]
        groups.append({"index": group.index, "models": list(group.models), "loss": group.loss,
                       "shared": group.shared, "engine": decision.engine.value, "reason": decision.reason,
                       "span": train.span.to_json()})
    plan = {
        "dsgraph_plan": PLAN_VERSION,
        "pipeline": p.name,
        "file": p.file,
        "world_size": ctx.world_size,
        "settings": _settings(p.settings),
        "data": [{"name": d.name, "source": d.source.to_json(), "fields": list(d.fields) if d.fields else None,
                  "span": d.span.to_json()} for d in p.data.values()],
        "models": models,
        "groups": groups,
        "frozen_engine": strategy.frozen.engine.value if strategy.frozen else None,
        "frozen_reason": strategy.frozen.reason if strategy.frozen else None,
        "setup": _setup(ctx, models),
        "step": _training_step(ctx),
        "losses": {name: {"expr": ir.expr_to_json(loss.expr), "text": ir.show_expr(loss.expr),
                          "terms": _terms(loss), "span": loss.span.to_json()} for name, loss in p.losses.items()},
    }
    plan["digest"] = hashlib.sha256(json.dumps(_without_spans(plan), sort_keys=True).encode()).hexdigest()[:16]
    return Plan(plan)


def _settings(s: ir.Settings) -> dict[str, Any]:
    return {"seed": s.seed, "steps": s.steps, "epochs": s.epochs, "micro_batch": s.micro_batch,
            "grad_accum": s.grad_accum, "log_every": s.log_every, "checkpoint_every": s.checkpoint_every,
            "precision": s.precision.value}


def _setup(ctx: Context, models: list[dict]) -> list[dict]:
    """The order Accelerate needs: the first Accelerator holds every plugin (the first trained
    model's first, so it is the default); each model is built and prepared with its own plugin
    selected; the training plugin is selected again before the loop. Native engines follow."""
    p = ctx.pipeline
    steps: list[dict] = []
    accel = [m for m in models if m["engine"] == Engine.ACCELERATE.value]
    accel_trained = sorted((m for m in accel if m["role"] == "trained"), key=lambda m: m["accelerator"])
    accel_frozen = [m for m in accel if m["role"] == "frozen"]
    native = [m for m in models if m["engine"] == Engine.DEEPSPEED.value]
    span = lambda m: p.models[m["name"]].span  # noqa: E731
    if accel:
        plugins = [m["name"] for m in accel_trained + accel_frozen]
        first = accel_trained[0]
        steps.append(_step("create_accelerator", span(first), accelerator=0, plugins=plugins,
                           mixed_precision={"fp32": "no"}.get(first["precision"], first["precision"])))
    for index, m in enumerate(accel_trained):
        if index > 0:
            steps.append(_step("create_accelerator", span(m), accelerator=m["accelerator"], plugins=[]))
        steps.append(_step("select_plugin", span(m), model=m["name"]))
        steps.append(_build_step(m, span(m)))
        prepare = ["model", "optimizer"] + (["scheduler"] if "scheduler" in m["deepspeed_config"] else [])
        steps.append(_step("prepare", span(m), model=m["name"], accelerator=m["accelerator"], objects=prepare))
    for m in accel_frozen:
        steps.append(_step("select_plugin", span(m), model=m["name"]))
        steps.append(_build_step(m, span(m)))
        steps.append(_step("prepare", span(m), model=m["name"], accelerator=0, objects=["model"], eval=True))
    for m in sorted(native, key=lambda m: (m["role"] != "frozen", m["group"] or 0, m["name"])):
        steps.append(_build_step(m, span(m)))
        steps.append(_step("initialize", span(m), model=m["name"], eval=m["role"] == "frozen",
                           objects=["model"] if m["role"] == "frozen" else ["model", "optimizer"]
                           + (["scheduler"] if "scheduler" in m["deepspeed_config"] else [])))
    # dsgraph deals the batches itself, in the order Accelerate's prepared DataLoader gives: the
    # same for both engine kinds, resumable, and free of Accelerate's end-of-data sync.
    for name, data in p.data.items():
        steps.append(_step("shard_data", data.span, data=name))
    if accel_trained:
        steps.append(_step("select_plugin", span(accel_trained[0]), model=accel_trained[0]["name"],
                           why="the training plugin is active during the loop"))
    for number, step in enumerate(steps, 1):
        step["id"] = number
    return steps


def _build_step(m: dict, span) -> dict:
    # A LoRA model is wrapped in its adapter right after it is built, before prepare/initialize.
    lora = {"lora": True} if m["lora"] else {}
    return _step("build_model", span, model=m["name"], zero_init=m["zero_init"], **lora)


def _training_step(ctx: Context) -> list[dict]:
    p, analysis, graph = ctx.pipeline, ctx.analysis, ctx.graph
    steps: list[dict] = []
    reached = set().union(*(grp.reach for grp in analysis.groups)) if analysis.groups else set()
    for node in analysis.order:
        if not node.startswith("call:") or node not in reached:
            continue
        call: ir.ModelCall = graph.nodes[node]["call"]
        owners = sorted(analysis.call_groups[node])
        owner = owners[0] if owners else None
        steps.append(_step("forward", call.span, call=node[5:], model=call.model,
                           args=[ir.expr_to_json(a) for a in call.args],
                           kwargs={k: ir.expr_to_json(v) for k, v in call.kwargs},
                           no_grad=not owners, grad_group=owner,
                           detach=[d[5:] for d in analysis.detached_inputs(node, owner, graph)]))
    trains = {t.index: t for t in p.trains}
    for group in analysis.groups:
        train = trains[group.index]
        losses = [n[5:] for n in analysis.in_order(group.reach, "loss:")]
        detach = sorted(c[5:] for c in analysis.in_order(group.reach, "call:")
                        if analysis.call_groups[c] and group.index not in analysis.call_groups[c])
        steps.append(_step("losses", train.span, group=group.index, losses=losses, detach=detach))
        steps.append(_step("backward", train.span, group=group.index, loss=group.loss,
                           models=list(group.models), engine=ctx.strategy.groups[group.index].engine.value))
        steps.append(_step("optimizer_step", train.span, group=group.index, models=list(group.models)))
    return steps


def _terms(loss: ir.Loss) -> list[dict]:
    """The weighted terms of a loss, each with a short name for the metrics (`kd/kl`, `kd/ce`)."""
    terms, seen = [], {}
    for term in split_terms(loss.expr):
        match term.expr:
            case ir.LossFn(fn=fn):
                short = fn.rpartition(":")[2]
            case ir.LossRef(name=n):
                short = n
            case _:
                short = "term"
        seen[short] = seen.get(short, 0) + 1
        name = short if seen[short] == 1 else f"{short}#{seen[short]}"
        entry = {"name": f"{loss.name}/{name}", "weight": term.weight, "expr": ir.expr_to_json(term.expr),
                 "text": ir.show_expr(term.expr)}
        if isinstance(term.expr, ir.LossFn) and term.expr.builtin and catalogue.LOSSES[term.expr.fn].stats:
            entry["stats"] = list(catalogue.LOSSES[term.expr.fn].stats)     # logged as `kd/dpo.reward_margin`
        terms.append(entry)
    return terms


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return value


def _without_spans(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_spans(v) for k, v in value.items() if k not in ("span", "file")}
    if isinstance(value, list):
        return [_without_spans(v) for v in value]
    return value
