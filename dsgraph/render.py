"""The plan as text: readable, deterministic and aligned (`dsgraph compile`). Every setup step and
every op of the training step is printed with its id and its .dsg line, in the order the run
executes them."""

from __future__ import annotations

import json
from typing import Any

from dsgraph import plan as P
from dsgraph.compat import assert_never
from dsgraph.source import Span


def _line(span: Span) -> str:
    return f"line {span.line}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _flat(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(config, dict) and config:
        out = []
        for key in config:
            out += _flat(config[key], f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, json.dumps(config))]


def _lora_text(lora: P.Lora | None) -> str:
    if lora is None:
        return ""
    targets = ",".join(lora.targets) if lora.targets else "default targets"
    return f" + lora(r={lora.r}, alpha={lora.alpha:g}, {targets})"


def _quantize_text(quantize: P.Quantize) -> str:
    double = ", double quant" if quantize.double_quant else ""
    return f"4-bit {quantize.type} (bitsandbytes{double})"


def to_text(plan: P.Plan) -> str:
    s = plan.settings
    world = plan.world_size if plan.world_size is not None else "set at launch"
    length = f"{s.steps} steps" if s.steps is not None else f"{s.epochs} epochs"
    out = [
        f"plan {plan.pipeline}  ({plan.file}, digest {plan.digest})",
        f"  {length}, micro_batch {s.micro_batch} per process, grad_accum {s.grad_accum}, "
        f"seed {s.seed}, world size {world}",
        "",
    ]
    out.append("models")
    rows = [["name", "role", "engine", "acc", "zero", "precision", "group", "source"]]
    for m in plan.models:
        accelerator = "-" if m.accelerator is None else str(m.accelerator)
        rows.append(
            [
                m.name,
                m.role.value,
                plan.engine_of(m).value,
                accelerator,
                f"stage {m.stage.value}",
                m.precision.value,
                "-" if m.group is None else str(m.group),
                f"{m.source.kind.value}:{m.source.target}" + _lora_text(m.lora),
            ]
        )
    out += _table(rows)
    out += [f"  {m.name}: {m.zero_auto}" for m in plan.models if m.zero_auto] + [""]
    out.append("groups")
    for grp in plan.groups:
        models = [m.name for m in plan.models_of(grp.index)]
        kind = "shared loss" if len(models) > 1 else "single"
        out.append(
            f"  {grp.index}  train {', '.join(models)} on {grp.loss}  [{kind}, {grp.engine.value}: {grp.reason}]"
        )
    if plan.frozen:
        out.append(f"  frozen models: {plan.frozen.engine.value}: {plan.frozen.reason}")
    out += ["", "setup"]
    out += _table([[f"{st.id:>2}", st.kind, setup_detail(plan, st), _line(st.span)] for st in plan.setup])
    out += _cache_text(plan)
    accum = f"; each op runs for each of {s.grad_accum} micro batches" if s.grad_accum > 1 else ""
    out += ["", f"each step{accum}"]
    out += [*_table([[f"{op.id:>2}", op.kind, op_detail(plan, op), _line(op.span)] for op in plan.step]), ""]
    out.append("losses")
    out += [*_table([[loss.name, "=", loss.text] for loss in plan.losses]), ""]
    if plan.evaluation is not None:
        every = f"every {s.eval_every} steps and at the end" if s.eval_every else "at the end"
        sets = ", ".join(f"{val} for {train}" for train, val in plan.evaluation.sets)
        out.append(f"evaluation {every} ({sets}); each eval batch, every model in eval mode, no_grad")
        out += _table(
            [[f"{op.id:>2}", op.kind, eval_op_detail(plan, op), _line(op.span)] for op in plan.evaluation.step]
        )
        out += _table([[loss.name, "=", loss.text] for loss in plan.evaluation.losses], "      ")
        stats = [f"{t.name}.{stat}" for loss in plan.evaluation.losses for t in loss.terms for stat in t.stats]
        if stats:
            out.append(f"  reported beside the losses: {', '.join(stats)}")
        out.append("")
    for m in plan.models:
        out.append(f"deepspeed config of {m.name}")
        rules = {fill.value: fill.rule for fill in m.fills}
        rows = [[k, v + (f"   # at run time: {rules[k]}" if k in rules else "")] for k, v in _flat(m.deepspeed_config)]
        out += [*_table(rows), ""]
    return "\n".join(out).rstrip() + "\n"


_WIDTH_WORDS = {
    P.Width.SOURCE: "width from its source",
    P.Width.MODEL: "width measured on the built model",
    P.Width.DEFAULT: "width 1024: a factory's ZeRO-3 model is partitioned as it is built",
}


def _objects(m: P.Model) -> str:
    client = f" (client: {m.client_optimizer.show()})" if m.client_optimizer else ""
    return ", ".join(o + client if o == "optimizer" else o for o in m.engine_objects)


def setup_detail(plan: P.Plan, st: P.SetupStep) -> str:
    match st:
        case P.InitProcessGroup():
            return "torch.distributed for the native engines"
        case P.BuildData(data=data):
            return data
        case P.ShardData(data=data):
            d = plan.data_set(data)
            order = "shuffled each epoch" if d.shuffle else "in file order"
            end = "" if d.drop_last else ", the uneven end completed from the start"
            workers = f", {d.workers} loader workers" if d.workers else ""
            workers += f", collate {d.collate.show()}" if d.collate else ""
            return f"{data} (each rank its own shard, {order}{end}, as Accelerate deals it{workers})"
        case P.ShardEval(data=data):
            return f"{data} (eval set: file order, batch k to rank k mod world size, the end padded)"
        case P.CompleteConfig(model=name):
            m = plan.model(name)
            count = len(m.fills)
            values = f'{count} "auto" value{"s" if count != 1 else ""}' if count else 'nothing "auto"'
            return f"{name} ({values}" + (f"; {_WIDTH_WORDS[m.width]})" if m.width else ")")
        case P.CreateAccelerator(accelerator=index, plugins=plugins):
            listed = f" plugins=[{', '.join(plugins)}]" if plugins else " (plugins shared)"
            mixed = plan.mixed_precision(st)
            return f"acc{index}{listed}" + (f" mixed_precision={mixed}" if mixed else "")
        case P.SelectPlugin(model=name, why=why):
            return name + (f"  ({why})" if why else "")
        case P.BuildModel(model=name):
            m = plan.model(name)
            whole = "4-bit weights load outside zero.Init" if m.quantize else "zero_init = false"
            return (
                name
                + (f"  {_quantize_text(m.quantize)}" if m.quantize else "")
                + ("  under zero.Init" if m.zero_init else "")
                + (f"  whole ({whole}: partitioned by its engine)" if m.built_whole else "")
                + ("  + gradient checkpointing" if m.gradient_checkpointing else "")
                + ("  + LoRA adapter (base weights frozen)" if m.lora else "")
            )
        case P.Prepare(model=name):
            m = plan.model(name)
            return f"{name} on acc{m.accelerator}: {_objects(m)}" + ("" if m.trained else "  (eval)")
        case P.Initialize(model=name):
            m = plan.model(name)
            return f"{name}: {_objects(m)}" + ("" if m.trained else "  (eval)")
        case _:
            assert_never(st)


def _size(count: int | None) -> str:
    if count is None:
        return "? bytes (known at run time)"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _cache_text(plan: P.Plan) -> list[str]:
    """The cache decisions and the precompute phase, between the setup and the loop."""
    out: list[str] = []
    if plan.cache:
        out += ["", "cache"]
        out += _table([[d.model, "cached" if d.cached else "not cached", d.reason, _line(d.span)] for d in plan.cache])
    pre = plan.precompute
    if pre is None:
        return out
    where = pre.directory or "RUN_DIR/cache"
    out += ["", f"precompute (once, before the loop; cache in {where}, reused when its manifest matches)"]
    rows = []
    for st in pre.steps:
        match st:
            case P.FillCache():
                count = "?" if st.rows is None else f"{st.rows}"
                detail = f"{st.text} over {st.data}: {count} rows -> {', '.join(st.entries)}, {_size(st.bytes)}"
            case P.ReleaseModel(model=name):
                detail = f"{name}: engine destroyed, its memory freed for the loop"
            case _:
                assert_never(st)
        rows.append([f"{st.id:>2}", st.kind, detail, _line(st.span)])
    out += _table(rows)
    for e in pre.entries:
        whole = "whole output" if e.topk is None else f"top-{e.topk} log-probabilities + int32 ids per position"
        at = f" (log_softmax(x / {e.temperature:g}))" if e.topk is not None and e.temperature != 1.0 else ""
        out.append(f"  entry {e.id}: {whole}{at}")
    return out


def op_detail(plan: P.Plan, op: P.StepOp) -> str:
    match op:
        case P.NextBatch(data=data):
            return f"{data} (this rank's next micro batch, to the device)"
        case P.ReadCache(entry=entry, data=data):
            return f"{entry} (cached rows of {data} at the batch's sample indices, to the device)"
        case P.Generate():
            return _generate_text(plan, op)
        case P.ScoreReward(call=call, reward=reward):
            return f"{call} = {plan.reward(reward).source.show()}  (one number per completion)"
        case P.Forward():
            mode = "no_grad" if op.no_grad else f"grad -> group {op.grad_group}"
            detach = f"  detach {', '.join(op.detach)}" if op.detach else ""
            return f"{op.call} = {op.text}  [{mode}]{detach}"
        case P.ComputeLoss(loss=loss, group=group, detach=detach):
            return f"group {group}: {loss}" + (f"  detach {', '.join(detach)}" if detach else "")
        case P.Backward(group=index):
            grp = plan.group(index)
            models = ", ".join(m.name for m in plan.models_of(index))
            return f"group {index}: {grp.loss} -> {models} ({grp.engine.value})"
        case P.OptimizerStep(group=index):
            models = ", ".join(m.name for m in plan.models_of(index))
            if plan.group(index).engine is P.Engine.ACCELERATE:  # Accelerate's loop calls; no-ops under DeepSpeed
                return f"group {index}: step + zero_grad {models} (the engine steps in accelerator.backward)"
            return f"group {index}: step + zero_grad {models} (engine.step)"
        case _:
            assert_never(op)


def _generate_text(plan: P.Plan, op: P.Generate) -> str:
    gen, model = plan.generation(op.generation), plan.model(op.model)
    sampling = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature:g}, top_p {gen.top_p:g}"
    stop = f", stop at {', '.join(map(str, gen.stop))} or the end token" if gen.stop else ", stop at the end token"
    if model.stage is P.ZeroStage.ZERO3:
        weights = "weights gathered once" if gen.gather == "once" else "weights gathered layer by layer"
        mode = f"no_grad, eval mode, ZeRO-3: {weights}" + (f"; {gen.gather_reason}" if gen.gather_reason else "")
    else:
        mode = "no_grad, eval mode"
    reuse = f"; each batch of prompts and rollouts kept for {gen.iterations} steps" if gen.iterations > 1 else ""
    return (
        f"{gen.name} = {gen.model}({gen.data}): {gen.samples} per prompt, <= {gen.max_new_tokens} new tokens, "
        f"{sampling}{stop}{reuse}  [{mode}]"
    )


def eval_op_detail(plan: P.Plan, op: P.EvalOp) -> str:
    match op:
        case P.NextBatch(data=data):
            return f"{data} (this rank's next eval batch, to the device)"
        case P.ReadCache(entry=entry, data=data):
            return f"{entry} (cached rows of {data} at the batch's sample indices)"
        case P.Forward():
            return f"{op.call} = {op.text}  [no_grad]"
        case P.EvalLoss(loss=loss):
            return f"{loss}: summed over samples, averaged over the whole eval set"
        case _:
            assert_never(op)
