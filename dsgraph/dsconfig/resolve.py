"""The full DeepSpeed config of each model, with "auto" resolved from the pipeline.

Frozen models lose optimizer, scheduler and clipping and keep the batch keys DeepSpeed still
requires. What only the run can know (bucket sizes from the model, the batch size without a
world size) stays "auto" and is listed in `runtime` with the rule the runtime applies."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from dsgraph import catalogue, ir
from dsgraph.analysis import Analysis, Role
from dsgraph.dsconfig.keys import RUNTIME_AUTO, zero_stage
from dsgraph.plan import Fill, Precision


@dataclass(frozen=True)
class Problem:
    code: str
    path: str  # the config key it is about ("" for the model itself)
    message: str
    help: str


@dataclass(frozen=True)
class Resolved:
    """A model's full DeepSpeed config. Not changed after `resolve` returns it: the plan carries it."""

    config: dict[str, Any]  # DeepSpeed's own shape; "auto" only at the paths in `fills`
    fills: tuple[Fill, ...]  # what the run fills (plan.Fill), in config order
    problems: tuple[Problem, ...]


def zero_of(pipeline: ir.Pipeline, model: ir.Model) -> ir.ZeroConfig | None:
    return pipeline.zeros.get(model.zero) if model.zero else None


def precision_of(pipeline: ir.Pipeline, model: ir.Model) -> Precision:
    """The model's own `precision`, else its ZeRO config's, else the pipeline's."""
    zero = zero_of(pipeline, model)
    return model.precision or (zero.precision if zero else None) or pipeline.settings.precision


def resolve_configs(pipeline: ir.Pipeline, analysis: Analysis, world_size: int | None) -> dict[str, Resolved]:
    """The resolution stage: every model's config, resolved for its role."""
    return {
        name: resolve(pipeline, model, analysis.roles[name] is Role.TRAINED, world_size)
        for name, model in pipeline.models.items()
    }


class _Building:
    """The config being resolved, what the run must fill in it and the problems found."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.runtime: dict[Fill, None] = {}  # ordered set
        self.problems: list[Problem] = []

    def problem(self, code: str, path: str, message: str, help: str) -> None:
        self.problems.append(Problem(code, path, message, help))


def resolve(pipeline: ir.Pipeline, model: ir.Model, trained: bool, world_size: int | None) -> Resolved:
    zero = zero_of(pipeline, model)
    out = _Building(copy.deepcopy(zero.config) if zero else {})
    cfg = out.config
    block = cfg.setdefault("zero_optimization", {})
    stage = zero_stage(cfg)
    block["stage"] = "auto" if stage is None else stage  # a whole number from here on
    _precision(pipeline, model, zero, out)
    _batch(pipeline.settings, world_size, out)
    if trained:
        _optimizer(model, out)
        _scheduler(pipeline, model, out)
        # Always explicit: DeepSpeed 0.19 clips at 1.0 when the key is absent.
        if model.clip is not None:
            cfg["gradient_clipping"] = model.clip
        elif cfg.get("gradient_clipping", "auto") == "auto":
            cfg["gradient_clipping"] = 0.0
    else:
        for key in ("optimizer", "scheduler", "gradient_clipping"):
            cfg.pop(key, None)
    cfg.setdefault("steps_per_print", 10**9)  # DeepSpeed's own progress lines stay quiet
    _runtime_autos(cfg, "", out)
    return Resolved(cfg, tuple(sorted(out.runtime, key=lambda f: f.value)), tuple(out.problems))


def _precision(pipeline: ir.Pipeline, model: ir.Model, zero: ir.ZeroConfig | None, out: _Building) -> None:
    precision = precision_of(pipeline, model)
    if model.precision and zero and zero.precision and zero.precision is not model.precision:
        out.problem(
            "DSG414",
            "",
            f"model `{model.name}` asks for "
            f"{model.precision.value} but its ZeRO config `{zero.name}` enables "
            f"{zero.precision.value}",
            "make the two agree, or remove one of them",
        )
    for key in ("bf16", "fp16"):
        if precision.value == key:
            block = out.config.get(key)
            out.config[key] = {**(block if isinstance(block, dict) else {}), "enabled": True}
        elif isinstance(out.config.get(key), dict):
            out.config[key]["enabled"] = False


def _batch(settings: ir.Settings, world_size: int | None, out: _Building) -> None:
    cfg = out.config
    micro, accum = settings.micro_batch, settings.grad_accum
    given = cfg.get("train_micro_batch_size_per_gpu", "auto")
    if given != "auto" and given != micro:
        out.problem(
            "DSG406",
            "train_micro_batch_size_per_gpu",
            f"the config's train_micro_batch_size_per_gpu is {given} but the pipeline's micro_batch is {micro}",
            'all models see the same batches: set it to "auto" or remove it',
        )
    given = cfg.get("gradient_accumulation_steps", "auto")
    if given != "auto" and given != accum:
        out.problem(
            "DSG405",
            "gradient_accumulation_steps",
            f"the config's gradient_accumulation_steps is {given} but the pipeline's grad_accum is {accum}",
            'set it to "auto" or remove it; the pipeline\'s `grad_accum` applies',
        )
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    given = cfg.get("train_batch_size", "auto")
    if given != "auto" and isinstance(given, int):
        if world_size is not None and given != micro * accum * world_size:
            out.problem(
                "DSG406",
                "train_batch_size",
                f"train_batch_size {given} != micro_batch {micro} * grad_accum "
                f"{accum} * world size {world_size} = {micro * accum * world_size}",
                'set train_batch_size to "auto", or change the world size',
            )
        elif given % (micro * accum):
            out.problem(
                "DSG406",
                "train_batch_size",
                f"train_batch_size {given} is not a multiple of micro_batch {micro} "
                f"* grad_accum {accum}; no world size can make it hold",
                'set train_batch_size to "auto"',
            )
    if world_size is not None:
        cfg["train_batch_size"] = micro * accum * world_size
    elif given == "auto" or "train_batch_size" not in cfg:
        cfg["train_batch_size"] = "auto"
        out.runtime[Fill.TRAIN_BATCH_SIZE] = None


def _optimizer(model: ir.Model, out: _Building) -> None:
    cfg = out.config
    if model.optimizer is not None and model.optimizer.factory is not None:
        cfg.pop("optimizer", None)  # a client optimizer: DeepSpeed wraps the one the factory makes
        cfg["zero_allow_untested_optimizer"] = True
        return
    if model.optimizer is not None:
        params = dict(model.optimizer.params)
        if model.optimizer.kind == "adam":
            params["adam_w_mode"] = False  # DeepSpeed's "Adam" is AdamW unless told otherwise
        cfg["optimizer"] = {"type": catalogue.DEEPSPEED_OPTIMIZER_TYPES[model.optimizer.kind], "params": params}
    elif "optimizer" not in cfg:
        out.problem(
            "DSG413",
            "",
            f"model `{model.name}` is trained but has no optimizer",
            f'add `optimizer = adamw(lr=1e-3)` to `{model.name}`, or an "optimizer" block to its DeepSpeed JSON file',
        )
        return
    else:
        for key, value in cfg["optimizer"].get("params", {}).items():
            if value == "auto":
                out.problem(
                    "DSG412",
                    f"optimizer.params.{key}",
                    f'optimizer `{key}` is "auto" but model `{model.name}` declares no optimizer to fill it from',
                    f"add `optimizer = adamw(lr=...)` to `{model.name}`, or write the value",
                )
    if str(cfg["optimizer"].get("type", "")).lower() not in ("adam", "adamw"):
        # DeepSpeed builds it from torch.optim; ZeRO vouches for Adam(W) only.
        cfg["zero_allow_untested_optimizer"] = True


def _lr(cfg: dict[str, Any], model: ir.Model) -> Any:
    if model.optimizer is not None and model.optimizer.factory is not None:
        return model.optimizer.params.get("lr")  # a client optimizer's, when it is given as `lr=`
    return cfg.get("optimizer", {}).get("params", {}).get("lr")


def _scheduler(pipeline: ir.Pipeline, model: ir.Model, out: _Building) -> None:
    cfg, sched, steps = out.config, model.scheduler, pipeline.settings.steps
    total = steps if steps is not None else "auto"
    if sched is not None:
        cfg.pop("scheduler", None)
        p, lr = sched.params, _lr(cfg, model)
        if sched.kind == "constant":
            return
        if lr is None and sched.kind != "warmup_cosine":
            out.problem(
                "DSG412",
                "scheduler.params.warmup_max_lr",
                f"the scheduler of model `{model.name}` warms up to the optimizer's `lr`, which its client optimizer "
                "does not name",
                "pass the rate as `lr=` to the optimizer's factory, or use `scheduler = warmup_cosine(...)`",
            )
            return
        warm = {
            "warmup_min_lr": p.get("min_lr", 0.0),
            "warmup_max_lr": lr,
            "warmup_num_steps": p["warmup_steps"],
            "warmup_type": "linear",
        }
        if sched.kind == "warmup":
            cfg["scheduler"] = {"type": "WarmupLR", "params": warm}
        elif sched.kind == "warmup_decay":
            cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {**warm, "total_num_steps": total}}
        else:
            cfg["scheduler"] = {
                "type": "WarmupCosineLR",
                "params": {
                    "total_num_steps": total,
                    "warmup_num_steps": p["warmup_steps"],
                    "cos_min_ratio": p.get("min_ratio", 0.0),
                    "warmup_min_ratio": 0.0,
                },
            }
    elif "scheduler" in cfg:
        params = cfg["scheduler"].setdefault("params", {})
        fill = {"warmup_max_lr": _lr(cfg, model), "total_num_steps": total}
        for key, value in list(params.items()):
            if value == "auto" and fill.get(key) not in (None, "auto"):
                params[key] = fill[key]
            elif value == "auto" and key != "total_num_steps":
                out.problem(
                    "DSG412",
                    f"scheduler.params.{key}",
                    f'scheduler `{key}` is "auto" and nothing in the pipeline fills it',
                    f"declare `scheduler = warmup(warmup_steps=...)` on `{model.name}`, or write the value",
                )
    if cfg.get("scheduler", {}).get("params", {}).get("total_num_steps") == "auto":
        out.runtime[Fill.TOTAL_NUM_STEPS] = None


def _runtime_autos(node: Any, path: str, out: _Building) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _runtime_autos(value, f"{path}.{key}" if path else key, out)
    elif node == "auto" and path not in {f.value for f in out.runtime}:
        if path in {f.value for f in RUNTIME_AUTO}:
            out.runtime[Fill(path)] = None
        elif not path.startswith(("optimizer", "scheduler")):
            out.problem(
                "DSG412", path, f'`{path}` is "auto" and nothing in the pipeline or the run fills it', "write the value"
            )
