"""The IR: the pipeline with names resolved, values typed and defaults filled. Frozen dataclasses;
sources, data sets, LoRA adapters and quantization are the plan's own values, used as they are.

`show()` prints the whole IR deterministically (the `--emit ir` form)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from dsgraph.plan import DataSet, Engine, Lora, Precision, Quantize, Source
from dsgraph.source import Span


ZERO_AUTO = "auto"  # Model.zero of `zero = auto` until dsgraph.dsconfig.auto picks the stage


@dataclass(frozen=True)
class Settings:
    seed: int
    steps: int | None
    epochs: int | None
    micro_batch: int
    grad_accum: int
    log_every: int
    checkpoint_every: int
    precision: Precision
    eval_every: int
    track: tuple[str, ...]
    rank_metrics: bool
    cache_dir: str  # "": RUN_DIR/cache
    cache_budget: float  # GiB that `cache = auto` may fill
    spans: dict[str, Span] = field(compare=False)


@dataclass(frozen=True)
class ZeroConfig:
    """A DeepSpeed config as declared: an inline block, a JSON file, or a file with overrides."""

    name: str
    config: dict[str, Any]  # DeepSpeed's own shape, "auto" kept
    file: str | None  # the JSON path, relative to the .dsg file
    precision: Precision | None  # from `precision =` or the file's fp16/bf16
    key_spans: dict[str, Span] = field(compare=False)  # "zero_optimization.stage" -> span
    span: Span = field(compare=False)
    auto: str | None = field(default=None, compare=False)  # `zero = auto`: why this stage

    def span_of(self, path: str) -> Span:
        return self.key_spans.get(path, self.span)


@dataclass(frozen=True)
class Optimizer:
    kind: str  # adamw, adam, sgd; "factory": your own, `pkg.mod:make(lr=...)`
    params: dict[str, Any]
    span: Span
    factory: str | None = None  # `pkg.mod:make`, called with the trainable parameters


@dataclass(frozen=True)
class Scheduler:
    kind: str  # constant, warmup, warmup_decay, warmup_cosine
    params: dict[str, Any]
    span: Span


@dataclass(frozen=True)
class Model:
    name: str
    source: Source
    zero: str | None  # a ZeroConfig name (inline blocks get `<model>.zero`)
    frozen: bool
    optimizer: Optimizer | None
    scheduler: Scheduler | None
    clip: float | None
    precision: Precision | None  # the model's own `precision =`, if any
    span: Span
    spans: dict[str, Span] = field(compare=False)  # property name -> span
    lora: Lora | None = None
    engine: Engine | None = None  # `engine = native | accelerate`: forced
    zero_init: bool = True  # false: built whole even at ZeRO-3
    gradient_checkpointing: bool = False
    quantize: Quantize | None = None  # `quantize = bnb4(...)`: 4-bit weights (Hugging Face models)
    cache: CacheMode = "false"  # frozen models: hoisted out of the loop
    train_mode: bool = False  # frozen models: dropout on, still no gradients


CacheMode: TypeAlias = Literal["true", "false", "auto"]  # `cache = ...` on a frozen model
GatherMode: TypeAlias = Literal["once", "layers", "auto"]  # a ZeRO-3 generator's weights while it generates


@dataclass(frozen=True)
class Generation:
    """`generate rollouts = policy(prompts) {...}`: completions sampled from `model` for each
    batch of `data`'s prompts, `samples` per prompt (laid out prompt by prompt)."""

    name: str
    model: str
    data: str
    samples: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple[int, ...]  # token ids that end a completion (with the tokenizer's end token)
    gather: GatherMode
    span: Span
    spans: dict[str, Span] = field(compare=False)  # property name -> span
    model_span: Span | None = field(default=None, compare=False)  # `policy` in `= policy(prompts)`
    data_span: Span | None = field(default=None, compare=False)  # `prompts` in `= policy(prompts)`
    gather_reason: str | None = None  # `gather = auto`: what it chose, and why
    iterations: int = 1  # optimizer steps on each batch of rollouts (GRPO's mu)

    def show(self) -> str:
        stop = f" stop={list(self.stop)}" if self.stop else ""
        return (
            f"generate {self.name} = {self.model}({self.data}) samples={self.samples} "
            f"max_new_tokens={self.max_new_tokens} temperature={self.temperature:g} top_p={self.top_p:g}"
            f"{stop} gather={self.gather}"
            + (f" iterations={self.iterations}" if self.iterations != 1 else "")
            + (f" ({self.gather_reason})" if self.gather_reason else "")
        )


@dataclass(frozen=True)
class Reward:
    """`reward correct = builtin.sums()`: one number per completion of a generation."""

    name: str
    source: Source
    span: Span


# -- loss expressions --------------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    value: float | int | str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class FieldRef:
    data: str
    field: str
    span: Span = dataclasses.field(compare=False)


@dataclass(frozen=True)
class ModelCall:
    model: str
    args: tuple[LossExpr, ...]
    kwargs: tuple[tuple[str, LossExpr], ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Project:
    """`student(x).logits`: an attribute (or dict key) of a model's output."""

    obj: LossExpr
    attr: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class LossFn:
    fn: str  # "kl" for built-ins, "pkg.mod:fn" for factories
    builtin: bool
    args: tuple[LossExpr, ...]
    kwargs: tuple[tuple[str, LossExpr], ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class LossRef:
    name: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str
    left: LossExpr
    right: LossExpr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Neg:
    operand: LossExpr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Generated:
    """`rollouts.input_ids`: a field of a generation's current rollouts; `rollouts` (field None):
    the rollouts themselves, as the on-policy losses take them."""

    generation: str
    field: str | None
    span: Span = dataclasses.field(compare=False)


@dataclass(frozen=True)
class RewardCall:
    """`correct(rollouts)`: a reward of each completion of a generation."""

    reward: str
    generation: str
    span: Span = field(compare=False)


LossExpr: TypeAlias = Const | FieldRef | ModelCall | Project | LossFn | LossRef | BinOp | Neg | Generated | RewardCall

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def show_expr(expr: LossExpr, parent: int = 0) -> str:
    """The canonical text of an expression; equal calls print equal (the dedup key)."""
    match expr:
        case Const(value=v):
            return json.dumps(v) if isinstance(v, (str, bool)) else repr(v)
        case FieldRef(data=d, field=f):
            return f"{d}.{f}"
        case ModelCall(model=m, args=a, kwargs=k) | LossFn(fn=m, args=a, kwargs=k):
            parts = [show_expr(x) for x in a] + [f"{n}={show_expr(x)}" for n, x in k]
            return f"{m}({', '.join(parts)})"
        case Project(obj=o, attr=a):
            return f"{show_expr(o, 3)}.{a}"
        case LossRef(name=n):
            return n
        case Generated(generation=gen, field=f):
            return gen if f is None else f"{gen}.{f}"
        case RewardCall(reward=r, generation=gen):
            return f"{r}({gen})"
        case BinOp(op=op, left=l, right=r):
            prec = _PRECEDENCE[op]
            text = f"{show_expr(l, prec)} {op} {show_expr(r, prec + 1)}"
            return f"({text})" if prec < parent else text
        case Neg(operand=o):
            return f"-{show_expr(o, 3)}"
    raise TypeError(f"not a loss expression: {expr!r}")


def walk_inputs(expr: LossExpr) -> Iterator[LossExpr]:
    """The direct inputs of an expression: model calls, data fields, generated data, rewards and
    loss references, without descending into a model call's own arguments."""
    stack = [expr]
    while stack:
        node = stack.pop()
        match node:
            case ModelCall() | FieldRef() | LossRef() | Generated() | RewardCall():
                yield node
            case Project(obj=o):
                stack.append(o)
            case LossFn(args=a, kwargs=k):
                stack.extend(reversed([*a, *(x for _, x in k)]))
            case BinOp(left=l, right=r):
                stack.extend((r, l))
            case Neg(operand=o):
                stack.append(o)


def call_arguments(call: ModelCall) -> list[LossExpr]:
    return [*call.args, *(x for _, x in call.kwargs)]


@dataclass(frozen=True)
class Loss:
    name: str
    expr: LossExpr
    span: Span


@dataclass(frozen=True)
class Train:
    index: int
    models: tuple[str, ...]
    model_spans: tuple[Span, ...]
    loss: str
    loss_span: Span
    span: Span


@dataclass(frozen=True)
class Pipeline:
    name: str
    file: str
    settings: Settings
    data: dict[str, DataSet]
    zeros: dict[str, ZeroConfig]
    models: dict[str, Model]
    losses: dict[str, Loss]
    trains: tuple[Train, ...]
    span: Span
    # False when lowering reported errors: declarations that had them are missing, so what
    # looks unused or unreached may only be so because of them (the checks say nothing then).
    complete: bool = True
    generations: dict[str, Generation] = field(default_factory=dict)
    rewards: dict[str, Reward] = field(default_factory=dict)

    def show(self) -> str:
        s = self.settings
        out = [
            f"pipeline {self.name}",
            f"  settings seed={s.seed} steps={s.steps} epochs={s.epochs} "
            f"micro_batch={s.micro_batch} grad_accum={s.grad_accum} log_every={s.log_every} "
            f"checkpoint_every={s.checkpoint_every} precision={s.precision.value}"
            + (f" eval_every={s.eval_every}" if s.eval_every else "")
            + (f" track={','.join(s.track)}" if s.track else "")
            + (" rank_metrics" if s.rank_metrics else "")
            + (f" cache_dir={json.dumps(s.cache_dir)}" if s.cache_dir else "")
            + (f" cache_budget={s.cache_budget:g}" if s.cache_budget != 16.0 else ""),
        ]
        for d in self.data.values():
            fields = ",".join(d.fields) if d.fields is not None else "?"
            options = "" if d.shuffle else " shuffle=false"
            options += "" if d.drop_last else " drop_last=false"
            options += f" workers={d.workers}" if d.workers else ""
            options += f" eval={d.eval}" if d.eval else ""
            options += f" collate={d.collate.show()}" if d.collate else ""
            options += "" if d.deterministic is None else f" deterministic={str(d.deterministic).lower()}"
            out.append(f"  data {d.name} = {d.source.show()} fields=[{fields}]{options}")
        for z in self.zeros.values():
            origin = f" file={z.file}" if z.file else ""
            prec = f" precision={z.precision.value}" if z.precision else ""
            out.append(f"  zero {z.name}{origin}{prec} {json.dumps(z.config, sort_keys=True)}")
        for m in self.models.values():
            props = [f"zero={m.zero}", "frozen" if m.frozen else "trainable"]
            if m.optimizer:
                props.append(f"optimizer={m.optimizer.kind}{json.dumps(m.optimizer.params, sort_keys=True)}")
            if m.scheduler:
                props.append(f"scheduler={m.scheduler.kind}{json.dumps(m.scheduler.params, sort_keys=True)}")
            if m.clip is not None:
                props.append(f"clip={m.clip}")
            if m.precision:
                props.append(f"precision={m.precision.value}")
            if m.lora:
                props.append(f"lora{json.dumps(dataclasses.asdict(m.lora), sort_keys=True)}")
            if m.engine:
                props.append(f"engine={m.engine.value}")
            if not m.zero_init:
                props.append("zero_init=false")
            if m.gradient_checkpointing:
                props.append("gradient_checkpointing")
            if m.quantize:
                props.append(f"quantize=bnb4{json.dumps(dataclasses.asdict(m.quantize), sort_keys=True)}")
            if m.cache != "false":
                props.append(f"cache={m.cache}")
            if m.train_mode:
                props.append("train_mode")
            out.append(f"  model {m.name} = {m.source.show()} {' '.join(props)}")
        for gen in self.generations.values():
            out.append(f"  {gen.show()}")
        for reward in self.rewards.values():
            out.append(f"  reward {reward.name} = {reward.source.show()}")
        for loss in self.losses.values():
            out.append(f"  loss {loss.name} = {show_expr(loss.expr)}")
        for t in self.trains:
            out.append(f"  train {', '.join(t.models)} on {t.loss}")
        return "\n".join(out) + "\n"
