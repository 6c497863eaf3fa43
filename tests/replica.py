"""A plain single-process PyTorch replica of a plan: the same models (same seeds), the same
batches (every rank's shard, each evaluated as that rank does), torch optimizers with the plan's
hyper-parameters, gradient clipping per model, DeepSpeed's own (pure Python) LR schedules. No
DeepSpeed engine, no Accelerator, no process group: if dsgraph's orchestration of the engines
changed the arithmetic, the losses would differ."""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

from dsgraph import plan as P
from dsgraph.plan import Plan
from dsgraph.runtime import adapters, builtins, data, sources
from dsgraph.runtime.evaluate import Scope, evaluate
from dsgraph.runtime.executor import model_seed


def _optimizer(config: dict, params):
    spec = config["optimizer"]
    p = dict(spec["params"])
    if spec["type"] == "SGD":
        return torch.optim.SGD(
            params, lr=p["lr"], momentum=p.get("momentum", 0.0), weight_decay=p.get("weight_decay", 0.0)
        )
    cls = torch.optim.AdamW if spec["type"] == "AdamW" or p.get("adam_w_mode", True) else torch.optim.Adam
    return cls(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"], weight_decay=p["weight_decay"])


def _scheduler(config: dict, optimizer, total_steps: int):
    if "scheduler" not in config:
        return None
    from deepspeed.runtime import lr_schedules

    spec = config["scheduler"]
    params = dict(spec["params"])
    if params.get("total_num_steps") == "auto":
        params["total_num_steps"] = total_steps
    return getattr(lr_schedules, spec["type"])(optimizer, **params)


class _Shards:
    """Every rank's batches, as the runtime deals them."""

    def __init__(self, dataset, micro: int, seed: int, world: int, declared: P.DataSet):
        self.loaders = [
            data.sharded_loader(dataset, micro, seed, r, world, declared.shuffle, declared.drop_last)
            for r in range(world)
        ]
        self.iters = [iter(loader) for loader in self.loaders]

    def next_per_rank(self) -> list[dict]:
        batches = []
        for r, it in enumerate(self.iters):
            try:
                batches.append(next(it))
            except StopIteration:
                self.iters[r] = iter(self.loaders[r])
                batches.append(next(self.iters[r]))
        return batches


def load_plan(run_dir: Path) -> Plan:
    return Plan.from_json((run_dir / "plan.json").read_text())


def build_model(plan: Plan, m: P.Model) -> torch.nn.Module:
    """Model `m` as every rank builds it (same seed, 4-bit weights and adapter by the runtime's own
    helpers), as one whole model."""
    torch.manual_seed(model_seed(plan.settings.seed, m.name))
    quantization = adapters.quantization_config(m.quantize, m.precision) if m.quantize else None
    model = sources.build(m.source, builtins.MODELS, Path(plan.file).parent, quantization=quantization)
    if m.quantize and m.trained:
        model = adapters.prepare_4bit_training(model, m.gradient_checkpointing)
    if m.lora:
        model = adapters.apply_lora(
            model, m.lora, model_seed(plan.settings.seed, f"{m.name}/lora"), sources.model_task(m.source, model)
        )
    if m.quantize:
        adapters.keep_4bit_layout(model)
    return model


def replicate(plan: Plan, world: int) -> list[dict[str, float]]:
    """The losses of every optimizer step, as {loss name: value}."""
    settings = plan.settings
    base = Path(plan.file).parent
    if str(base.resolve()) not in sys.path:  # factories live beside the .dsg file
        sys.path.insert(0, str(base.resolve()))
    micro, accum, steps = settings.micro_batch, settings.grad_accum, settings.steps
    assert steps is not None
    held_out = {d.eval for d in plan.data}
    shards = {
        d.name: _Shards(sources.build(d.source, builtins.DATA, base), micro, data.data_seed(settings.seed, i), world, d)
        for i, d in enumerate(plan.data)
        if d.name not in held_out
    }
    models, optimizers, schedulers = {}, {}, {}
    for m in plan.models:
        model = build_model(plan, m)
        if m.trained and m.client_optimizer is not None:  # the factory's own optimizer
            _, keywords = sources.call_args(m.client_optimizer.args)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizers[m.name] = sources.resolve_factory(m.client_optimizer.target)(trainable, **keywords)
            schedulers[m.name] = _scheduler(m.deepspeed_config, optimizers[m.name], steps)
            model.train()
        elif m.trained:
            optimizers[m.name] = _optimizer(m.deepspeed_config, [p for p in model.parameters() if p.requires_grad])
            schedulers[m.name] = _scheduler(m.deepspeed_config, optimizers[m.name], steps)
            model.train()
        else:
            model.requires_grad_(False).eval()
        models[m.name] = model
    # Each rank's loss is computed on its own micro batch, with its own RNG stream (dropout), and
    # DeepSpeed averages the ranks' gradients: so the replica back-propagates the mean of the
    # ranks' losses. (Concatenating the ranks' batches would differ for losses averaged over a
    # varying number of tokens, such as masked or shifted ones.)
    rng = []
    for r in range(world):
        torch.manual_seed(settings.seed * 7919 + r)
        rng.append(torch.get_rng_state())
    history = []
    for _ in range(steps):
        sums: dict[str, float] = {}
        for _ in range(accum):
            per_rank = {name: s.next_per_rank() for name, s in shards.items()}
            for r in range(world):
                torch.set_rng_state(rng[r])
                scope = Scope()
                for op in plan.step:  # the plan's ops, by plain PyTorch
                    match op:
                        case P.NextBatch(data=name):
                            scope.batches[name] = per_rank[name][r]
                        case P.Forward():
                            args = [evaluate(a, scope, op.detach, sources.resolve_factory) for a in op.args]
                            kwargs = {k: evaluate(v, scope, op.detach, sources.resolve_factory) for k, v in op.kwargs}
                            with torch.no_grad() if op.no_grad else contextlib.nullcontext():
                                scope.calls[op.call] = models[op.model](*args, **kwargs)
                        case P.ComputeLoss(loss=name):
                            value = None
                            for t in plan.loss(name).terms:
                                weighted = t.weight * evaluate(t.expr, scope, op.detach, sources.resolve_factory)
                                value = weighted if value is None else value + weighted
                            scope.losses[name] = value
                            sums.setdefault(name, 0.0)
                            sums[name] += float(value.detach()) / world
                        case P.Backward(group=group):
                            (scope.losses[plan.group(group).loss] / (accum * world)).backward()
                            scope.losses.clear()
                        case P.OptimizerStep():
                            pass  # below, once every rank's gradients are in
                rng[r] = torch.get_rng_state()
        for name, optimizer in optimizers.items():
            clip = plan.model(name).deepspeed_config.get("gradient_clipping", 0.0)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(models[name].parameters(), clip)
            optimizer.step()
            if schedulers[name] is not None:
                schedulers[name].step()
            optimizer.zero_grad()
        history.append({k: v / accum for k, v in sums.items()})
    return history


def evaluate_whole(plan: Plan, models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """The plan's evaluation in plain PyTorch, with each eval set as one batch of all its samples:
    every loss, term and statistic by name (`kd`, `kd/ce`, `kd/ce.accuracy`)."""
    assert plan.evaluation is not None
    base = Path(plan.file).parent
    scope, out = Scope(), {}
    for model in models.values():
        model.eval()
    with torch.no_grad():
        for op in plan.evaluation.step:
            match op:
                case P.NextBatch(data=name):
                    dataset = sources.build(plan.data_set(name).source, builtins.DATA, base)
                    whole = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
                    scope.batches[name] = whole
                case P.Forward():
                    args = [evaluate(a, scope, (), sources.resolve_factory) for a in op.args]
                    kwargs = {k: evaluate(v, scope, (), sources.resolve_factory) for k, v in op.kwargs}
                    scope.calls[op.call] = models[op.model](*args, **kwargs)
                case P.EvalLoss(loss=name):
                    value = None
                    for t in plan.evaluation.loss(name).terms:
                        with builtins.recording_stats() as stats:
                            term = evaluate(t.expr, scope, (), sources.resolve_factory)
                        out[t.name] = float(term)
                        for stat in t.stats:
                            total, count = stats[stat]
                            mean = float(total) / float(count)
                            out[f"{t.name}.{stat}"] = math.exp(mean) if stat == "perplexity" else mean
                        value = t.weight * term if value is None else value + t.weight * term
                    scope.losses[name] = value
                    out[name] = float(value)
    return out
