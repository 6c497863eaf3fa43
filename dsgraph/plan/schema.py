"""The plan: the one contract between the compiler and the runtime.

`dsgraph compile` prints a `Plan`; `dsgraph run` writes it to RUN_DIR/plan.json and every worker
executes it, setup step by setup step and training-step op by op. Everything here is a frozen
value: the models with their resolved DeepSpeed configs, the train groups, the setup steps, the
ops of one training step and the losses as typed expressions. Every entry keeps the span of the
.dsg line it comes from, so that a failure at run time still points at the line to fix.

A value has one home. A model's ZeRO stage, its precision and whether it is built under
`zero.Init` are read off its resolved DeepSpeed config; its role and engine follow from its train
group. The JSON form (`to_json`/`from_json`) is versioned: a plan of another version is refused.

The package imports nothing of the compiler or the runtime (only `dsgraph.source`)."""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass
from enum import Enum, IntEnum
from functools import cached_property
from typing import Any, TypeAlias

from dsgraph.plan.codec import decode, encode
from dsgraph.plan.steps import CreateAccelerator, EvalOp, Expr, Loss, PrecomputeStep, SetupStep, StepOp
from dsgraph.source import Span

PLAN_VERSION = 5

JsonObject: TypeAlias = dict[str, Any]


class PlanError(ValueError):
    """A plan file that this dsgraph cannot execute: another version, or not a plan at all."""


# -- closed sets ---------------------------------------------------------------------------------


class Role(str, Enum):
    TRAINED = "trained"
    FROZEN = "frozen"


class Engine(str, Enum):
    ACCELERATE = "accelerate"  # Accelerate's multi-plugin API: prepare() on an Accelerator
    DEEPSPEED = "deepspeed"  # native deepspeed.initialize engines


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ZeroStage(IntEnum):
    ZERO0 = 0
    ZERO1 = 1
    ZERO2 = 2
    ZERO3 = 3


class SourceKind(str, Enum):
    BUILTIN = "builtin"
    FACTORY = "factory"
    HF = "hf"


class Width(str, Enum):
    """How the run learns a model's width (hidden size), which its bucket sizes follow."""

    SOURCE = "source"  # from the source's arguments or its config.json, before it is built
    MODEL = "model"  # measured on the built model (a factory; built before its engine)
    DEFAULT = "default"  # a factory under ZeRO-3 is partitioned as it is built: 1024


class Fill(str, Enum):
    """A DeepSpeed config value that only the run can know, by its dotted path in the config."""

    TRAIN_BATCH_SIZE = "train_batch_size"
    REDUCE_BUCKET_SIZE = "zero_optimization.reduce_bucket_size"
    ALLGATHER_BUCKET_SIZE = "zero_optimization.allgather_bucket_size"
    PREFETCH_BUCKET_SIZE = "zero_optimization.stage3_prefetch_bucket_size"
    PARAM_PERSISTENCE_THRESHOLD = "zero_optimization.stage3_param_persistence_threshold"
    MAX_LIVE_PARAMETERS = "zero_optimization.stage3_max_live_parameters"
    MAX_REUSE_DISTANCE = "zero_optimization.stage3_max_reuse_distance"
    TOTAL_NUM_STEPS = "scheduler.params.total_num_steps"

    @property
    def rule(self) -> str:
        """How the run fills it, in words (printed beside the value)."""
        return _FILL_RULES[self]

    @property
    def needs_width(self) -> bool:
        return self in _WIDTH_FILLS


_FILL_RULES = {
    Fill.TRAIN_BATCH_SIZE: "micro_batch * grad_accum * world size",
    Fill.REDUCE_BUCKET_SIZE: "hidden_size * hidden_size of the model",
    Fill.ALLGATHER_BUCKET_SIZE: "hidden_size * hidden_size of the model",
    Fill.PREFETCH_BUCKET_SIZE: "0.9 * hidden_size * hidden_size of the model",
    Fill.PARAM_PERSISTENCE_THRESHOLD: "10 * hidden_size of the model",
    Fill.MAX_LIVE_PARAMETERS: "DeepSpeed's default (1e9)",
    Fill.MAX_REUSE_DISTANCE: "DeepSpeed's default (1e9)",
    Fill.TOTAL_NUM_STEPS: "epochs * steps per epoch of the data",
}
_WIDTH_FILLS = frozenset(
    {Fill.REDUCE_BUCKET_SIZE, Fill.ALLGATHER_BUCKET_SIZE, Fill.PREFETCH_BUCKET_SIZE, Fill.PARAM_PERSISTENCE_THRESHOLD}
)


# -- declarations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a model, data set or loss function comes from. The compiler never imports it."""

    kind: SourceKind
    target: str  # "mlp", "pkg.mod:fn", or the hf path ("config" for a block)
    args: tuple[tuple[str, Any], ...]  # positional arguments are named "0", "1", ...
    span: Span

    def show(self) -> str:
        args = ", ".join(json.dumps(v) if k.isdigit() else f"{k}={json.dumps(v)}" for k, v in self.args)
        name = {SourceKind.BUILTIN: f"builtin.{self.target}", SourceKind.FACTORY: self.target, SourceKind.HF: "hf"}[
            self.kind
        ]
        return f"{name}({args})"

    def arg(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self.args if k == name), default)


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter (PEFT): only the adapter is trained. `targets` None: PEFT's defaults for the
    architecture; `merge`: also export the merged weights."""

    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...] | None
    merge: bool


@dataclass(frozen=True)
class Quantize:
    """4-bit weights (bitsandbytes, as QLoRA loads them): every Linear layer of a Hugging Face
    model but its output head, `type` nf4 or fp4, `double_quant` also quantizing the scales. The
    packed weights are stored in the model's precision dtype; the model is built whole, outside
    zero.Init, and its engine partitions it."""

    type: str
    double_quant: bool


@dataclass(frozen=True)
class Settings:
    seed: int
    steps: int | None  # one of steps and epochs is set
    epochs: int | None
    micro_batch: int
    grad_accum: int
    log_every: int
    checkpoint_every: int
    precision: Precision
    eval_every: int  # 0: evaluate at the end only (when the pipeline has eval sets)
    track: tuple[str, ...]  # experiment trackers, beside metrics.jsonl (written by rank 0)
    rank_metrics: bool  # each rank also writes its own losses: ranks/rankN.metrics.jsonl


@dataclass(frozen=True)
class DataSet:
    """A data set and how it is dealt: `shuffle` (a new order each epoch, else file order),
    `drop_last` (an uneven end is dropped, else completed from the start as Accelerate does),
    `workers` (DataLoader worker processes). `eval`: the data set that evaluation reads in its
    place (its eval split)."""

    name: str
    source: Source
    fields: tuple[str, ...] | None  # None: known only at run time
    span: Span
    shuffle: bool = True
    drop_last: bool = True
    workers: int = 0
    eval: str | None = None
    eval_span: Span | None = None  # the `eval = NAME` entry
    collate: Source | None = None  # a factory returning the DataLoader's collate_fn
    # the same sample for the same index every time; None: as its source is (built-ins and files
    # are, a factory is not declared so)
    deterministic: bool | None = None


@dataclass(frozen=True)
class Model:
    """A model the pipeline uses. `group` is the train group that updates it (None: frozen);
    `accelerator` the Accelerator that prepares it (None: a native engine)."""

    name: str
    group: int | None
    accelerator: int | None
    source: Source
    zero: str | None  # the ZeRO config it was declared with
    lora: Lora | None
    deepspeed_config: JsonObject  # resolved: "auto" only at the paths in `fills`
    fills: tuple[Fill, ...]  # what the run fills in (CompleteConfig)
    width: Width | None  # where the width of a width-dependent fill comes from
    zero_auto: str | None  # `zero = auto`: why this stage
    span: Span
    # ZeRO-3 built outside zero.Init (`zero_init = false`, or 4-bit weights): partitioned by its engine
    built_whole: bool = False
    gradient_checkpointing: bool = False  # Hugging Face models only
    # `optimizer = pkg.mod:make(lr=...)`: called with the trainable parameters, then these
    # arguments; DeepSpeed wraps it as a client optimizer (the config has no "optimizer" block)
    client_optimizer: Source | None = None
    quantize: Quantize | None = None  # `quantize = bnb4(...)`: 4-bit base weights (built whole)
    train_mode: bool = False  # a frozen model run in train mode (dropout on), without gradients

    @property
    def role(self) -> Role:
        return Role.FROZEN if self.group is None else Role.TRAINED

    @property
    def trained(self) -> bool:
        return self.group is not None

    @property
    def stage(self) -> ZeroStage:
        return ZeroStage(self.deepspeed_config["zero_optimization"]["stage"])

    @property
    def zero_init(self) -> bool:
        """ZeRO-3 models are partitioned as their parameters are created, unless built whole."""
        return self.stage is ZeroStage.ZERO3 and not self.built_whole

    @property
    def precision(self) -> Precision:
        for precision in (Precision.BF16, Precision.FP16):
            block = self.deepspeed_config.get(precision.value)
            if isinstance(block, dict) and block.get("enabled") is True:
                return precision
        return Precision.FP32

    @property
    def engine_objects(self) -> tuple[str, ...]:
        """What its engine is made of: a frozen model alone; a trained one with the optimizer
        (and the scheduler) that DeepSpeed builds from its config."""
        if not self.trained:
            return ("model",)
        return ("model", "optimizer", "scheduler") if "scheduler" in self.deepspeed_config else ("model", "optimizer")


@dataclass(frozen=True)
class Group:
    """One `train` statement: the models it lists are updated by one backward of `loss`."""

    index: int
    loss: str
    engine: Engine
    reason: str
    span: Span
    forced: bool = False  # by `engine = ...` in the file, rather than chosen


@dataclass(frozen=True)
class Evaluation:
    """One pass over the eval sets, every `eval_every` steps and at the end: every model in eval
    mode, no gradients. `step` is what one eval batch runs; `losses` are the pipeline's losses
    with each data set read through its eval set (losses that read a data set without one are
    not evaluated)."""

    sets: tuple[tuple[str, str], ...]  # (training data set, its eval set)
    step: tuple[EvalOp, ...]
    losses: tuple[Loss, ...]

    def loss(self, name: str) -> Loss:
        return next(loss for loss in self.losses if loss.name == name)


@dataclass(frozen=True)
class FrozenEngine:
    """How the frozen models run (all of them the same way)."""

    engine: Engine
    reason: str
    forced: bool = False  # by `engine = ...` in the file, rather than chosen


@dataclass(frozen=True)
class CacheEntry:
    """A value the loop reads from the cache in place of a live call: the output of `call` at
    `path` (`teacher#1.logits`), whole, or at each position its `topk` largest log-probabilities
    (of the output divided by `temperature`) with their class ids."""

    id: str
    call: str
    path: tuple[str, ...]
    topk: int | None
    temperature: float | None


@dataclass(frozen=True)
class CacheDecision:
    """`cache = true | auto` on a frozen model: whether it is cached, and why."""

    model: str
    cached: bool
    reason: str
    span: Span


@dataclass(frozen=True)
class Precompute:
    """The phase between the setup and the loop: each hoisted call over its data sets, written to
    the cache in `directory` (relative to the .dsg file; "" for RUN_DIR/cache), then each cached
    model released. A cache whose manifest matches is reused, not computed again."""

    directory: str
    entries: tuple[CacheEntry, ...]
    steps: tuple[PrecomputeStep, ...]

    def entry(self, id: str) -> CacheEntry:
        return next(e for e in self.entries if e.id == id)

    @property
    def released(self) -> tuple[str, ...]:
        return tuple(s.model for s in self.steps if s.kind == "release_model")


@dataclass(frozen=True)
class Generation:
    """Completions sampled from `model` for each batch of `data`'s prompts (a `generate` op in
    the step): `samples` per prompt, laid out prompt by prompt, at most `max_new_tokens` each,
    ended by a `stop` id or the tokenizer's end token. `temperature` 0 is greedy. A ZeRO-3
    model's weights are gathered `once` for the whole generation, or one layer at a time
    (`layers`) as its forward needs them."""

    name: str
    model: str
    data: str
    samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: tuple[int, ...]
    gather: str  # once | layers
    gather_reason: str | None  # `gather = auto`: why once or layers
    iterations: int  # optimizer steps on each batch of rollouts: generated at steps 1, 1 + it, ...
    span: Span


@dataclass(frozen=True)
class Reward:
    """`reward NAME = SOURCE`: a built-in or `pkg.mod:fn` called with the prompts and completions
    of a generation and the source's arguments; one number per completion."""

    name: str
    source: Source
    span: Span


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    pipeline: str
    file: str
    world_size: int | None  # None: planned without one; train_batch_size is filled at run time
    settings: Settings
    data: tuple[DataSet, ...]
    models: tuple[Model, ...]
    groups: tuple[Group, ...]
    frozen: FrozenEngine | None  # None: no frozen model
    setup: tuple[SetupStep, ...]
    step: tuple[StepOp, ...]  # one micro step; run grad_accum times per optimizer step
    losses: tuple[Loss, ...]
    evaluation: Evaluation | None  # None: no eval set
    precompute: Precompute | None = None  # None: nothing hoisted
    cache: tuple[CacheDecision, ...] = ()  # every frozen model with `cache = true | auto`
    generations: tuple[Generation, ...] = ()
    rewards: tuple[Reward, ...] = ()

    def generation(self, name: str) -> Generation:
        return next(g for g in self.generations if g.name == name)

    def reward(self, name: str) -> Reward:
        return next(r for r in self.rewards if r.name == name)

    def data_set(self, name: str) -> DataSet:
        return next(d for d in self.data if d.name == name)

    def model(self, name: str) -> Model:
        return self._models[name]

    def group(self, index: int) -> Group:
        return self._groups[index]

    def loss(self, name: str) -> Loss:
        return self._losses[name]

    def models_of(self, group: int) -> tuple[Model, ...]:
        """The models a group trains, in the plan's order."""
        return self._by_group.get(group, ())

    def engine_of(self, model: Model) -> Engine:
        if model.group is not None:
            return self.group(model.group).engine
        assert self.frozen is not None, f"frozen model `{model.name}` without a frozen engine"
        return self.frozen.engine

    def mixed_precision(self, step: CreateAccelerator) -> str | None:
        """Accelerate's `mixed_precision` of an Accelerator: the first plugin's precision."""
        if not step.plugins:
            return None
        precision = self.model(step.plugins[0]).precision
        return "no" if precision is Precision.FP32 else precision.value

    @cached_property
    def _models(self) -> dict[str, Model]:
        return {m.name: m for m in self.models}

    @cached_property
    def _groups(self) -> dict[int, Group]:
        return {g.index: g for g in self.groups}

    @cached_property
    def _by_group(self) -> dict[int, tuple[Model, ...]]:
        by_group: dict[int, list[Model]] = {}
        for m in self.models:
            if m.group is not None:
                by_group.setdefault(m.group, []).append(m)
        return {group: tuple(models) for group, models in by_group.items()}

    @cached_property
    def _losses(self) -> dict[str, Loss]:
        return {loss.name: loss for loss in self.losses}

    @cached_property
    def digest(self) -> str:
        """A hash of the plan without spans and file names: it changes only when the plan does."""
        content = json.dumps(encode(self, TAGGED, skip=frozenset({"span", "file"})), sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        document = {"dsgraph_plan": PLAN_VERSION, **encode(self, TAGGED), "digest": self.digest}
        return json.dumps(document, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> Plan:
        try:
            document = json.loads(text)
        except ValueError as error:
            raise PlanError(f"not a dsgraph plan: {error}") from None
        version = document.get("dsgraph_plan") if isinstance(document, dict) else None
        if version is None:
            raise PlanError("not a dsgraph plan: it names no `dsgraph_plan` format version")
        if version != PLAN_VERSION:
            raise PlanError(
                f"this plan has format version {version}, but this dsgraph reads version "
                f"{PLAN_VERSION}: compile the .dsg file again with this dsgraph"
            )
        body = {k: v for k, v in document.items() if k not in ("dsgraph_plan", "digest")}
        try:
            plan: Plan = decode(Plan, body, TAGGED)
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"not a valid dsgraph plan of version {PLAN_VERSION}: {error}") from None
        if document.get("digest") != plan.digest:
            raise PlanError(
                f"the plan's digest {document.get('digest')} does not match its content "
                f"({plan.digest}): it was changed after it was compiled"
            )
        return plan


# The union members: each is written with its `kind`, by which it is read back.
TAGGED: frozenset[type] = frozenset(
    typing.get_args(SetupStep)
    + typing.get_args(StepOp)
    + typing.get_args(EvalOp)
    + typing.get_args(Expr)
    + typing.get_args(PrecomputeStep)
)
