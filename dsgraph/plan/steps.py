"""What the plan asks the runtime to do: the setup steps, the ops of one training step, and the
expressions (model-call arguments and loss terms) those ops evaluate. Each is a frozen value with
a `kind` (its name in the printed plan and in the JSON form), an `id` where it is a step, and the
span of the .dsg text it comes from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeAlias, final

from dsgraph.source import Span


# -- expressions: model-call arguments and loss terms ------------------------------------------


@final
@dataclass(frozen=True)
class Const:
    kind: ClassVar[str] = "const"
    value: float | int | str | bool
    span: Span


@final
@dataclass(frozen=True)
class Field:
    kind: ClassVar[str] = "field"
    data: str
    field: str
    span: Span


@final
@dataclass(frozen=True)
class CallOutput:
    """The output of the model call `call` (a Forward op's id)."""

    kind: ClassVar[str] = "call"
    call: str
    span: Span


@final
@dataclass(frozen=True)
class Attr:
    """`student(x).logits`: an attribute (or dict key) of a model's output."""

    kind: ClassVar[str] = "attr"
    of: Expr
    name: str
    span: Span


@final
@dataclass(frozen=True)
class LossCall:
    kind: ClassVar[str] = "loss_fn"
    fn: str  # "kl" for built-ins, "pkg.mod:fn" for factories
    builtin: bool
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]
    span: Span


@final
@dataclass(frozen=True)
class LossValue:
    """The value of another loss, computed earlier in the same train group."""

    kind: ClassVar[str] = "loss"
    loss: str
    span: Span


@final
@dataclass(frozen=True)
class BinOp:
    kind: ClassVar[str] = "binop"
    op: str  # + - * /
    left: Expr
    right: Expr
    span: Span


@final
@dataclass(frozen=True)
class Neg:
    kind: ClassVar[str] = "neg"
    operand: Expr
    span: Span


@final
@dataclass(frozen=True)
class Cached:
    """A cache entry's rows for the current batch (a `read_cache` op fetched them): what a hoisted
    call's output, or its top-k, was for these samples."""

    kind: ClassVar[str] = "cached"
    entry: str
    span: Span


@final
@dataclass(frozen=True)
class Generated:
    """A field of the current rollouts of a generation (a `generate` op made them); `field` None:
    the rollouts themselves, as `grpo` and `gkd` take them."""

    kind: ClassVar[str] = "generated"
    generation: str
    field: str | None
    span: Span


@final
@dataclass(frozen=True)
class RewardValue:
    """What a `reward` op computed for the current rollouts: one number per completion, [N, 1]."""

    kind: ClassVar[str] = "reward_value"
    call: str  # `correct(rollouts)`
    span: Span


Expr: TypeAlias = (
    Const | Field | CallOutput | Attr | LossCall | LossValue | BinOp | Neg | Cached | Generated | RewardValue
)


@dataclass(frozen=True)
class Term:
    """One weighted addend of a loss; `name` (`kd/kl`) is its id and its name in the metrics."""

    name: str
    weight: float
    expr: Expr
    text: str
    stats: tuple[str, ...]  # what a built-in loss reports beside its value (dpo's margin)


@dataclass(frozen=True)
class Loss:
    name: str
    text: str
    terms: tuple[Term, ...]  # the loss is the weighted sum of its terms
    span: Span


# -- setup steps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitProcessGroup:
    """The process group, when no Accelerator creates it."""

    kind: ClassVar[str] = "init_process_group"
    id: int
    span: Span


@dataclass(frozen=True)
class BuildData:
    kind: ClassVar[str] = "build_data"
    id: int
    data: str
    span: Span


@dataclass(frozen=True)
class CompleteConfig:
    """Fill the model's run-time values (its `fills`) and the device's settings: the config is
    final from here on."""

    kind: ClassVar[str] = "complete_config"
    id: int
    model: str
    span: Span


@dataclass(frozen=True)
class CreateAccelerator:
    """Accelerator 0 holds every plugin (the first is the default); later ones none."""

    kind: ClassVar[str] = "create_accelerator"
    id: int
    accelerator: int
    plugins: tuple[str, ...]
    span: Span


@dataclass(frozen=True)
class SelectPlugin:
    kind: ClassVar[str] = "select_plugin"
    id: int
    model: str
    why: str | None
    span: Span


@dataclass(frozen=True)
class BuildModel:
    """Build the model (under `zero.Init` at ZeRO-3), its LoRA adapter on top."""

    kind: ClassVar[str] = "build_model"
    id: int
    model: str
    span: Span


@dataclass(frozen=True)
class Prepare:
    """`accelerator.prepare` of the model's engine objects, on its Accelerator."""

    kind: ClassVar[str] = "prepare"
    id: int
    model: str
    span: Span


@dataclass(frozen=True)
class Initialize:
    """`deepspeed.initialize` of the model's engine objects."""

    kind: ClassVar[str] = "initialize"
    id: int
    model: str
    span: Span


@dataclass(frozen=True)
class ShardData:
    """Each rank its own shard of the data set, in the order Accelerate's prepared DataLoader deals."""

    kind: ClassVar[str] = "shard_data"
    id: int
    data: str
    span: Span


@dataclass(frozen=True)
class ShardEval:
    """Each rank its share of the eval set, in file order: batch k to rank k mod world size, the
    last batch possibly short; a rank left without a batch in the last round runs a padding batch
    that counts for nothing, so every rank takes part in every forward (a ZeRO-3 collective)."""

    kind: ClassVar[str] = "shard_eval"
    id: int
    data: str
    span: Span


SetupStep: TypeAlias = (
    InitProcessGroup
    | BuildData
    | CompleteConfig
    | CreateAccelerator
    | SelectPlugin
    | BuildModel
    | Prepare
    | Initialize
    | ShardData
    | ShardEval
)


# -- the ops of one training step --------------------------------------------------------------


@dataclass(frozen=True)
class NextBatch:
    kind: ClassVar[str] = "next_batch"
    id: int
    data: str
    span: Span


@dataclass(frozen=True)
class Forward:
    """One model call, made once per micro step whatever number of losses read it. `call` is its
    id; `grad_group` the group whose backward passes through it (None: no_grad); the calls in
    `detach` are read detached in its arguments."""

    kind: ClassVar[str] = "forward"
    id: int
    call: str
    text: str
    model: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]
    grad_group: int | None
    detach: tuple[str, ...]
    span: Span

    @property
    def no_grad(self) -> bool:
        return self.grad_group is None


@dataclass(frozen=True)
class ComputeLoss:
    """The loss's value for its group's backward; the calls in `detach` are read detached."""

    kind: ClassVar[str] = "loss"
    id: int
    loss: str
    group: int
    detach: tuple[str, ...]
    span: Span


@dataclass(frozen=True)
class Backward:
    kind: ClassVar[str] = "backward"
    id: int
    group: int
    span: Span


@dataclass(frozen=True)
class OptimizerStep:
    kind: ClassVar[str] = "optimizer_step"
    id: int
    group: int
    span: Span


@dataclass(frozen=True)
class ReadCache:
    """The rows of a cache entry at the sample indices of the current batch of `data`: read from
    the memory-mapped cache in place of the hoisted model's forward."""

    kind: ClassVar[str] = "read_cache"
    id: int
    entry: str
    data: str
    span: Span


@dataclass(frozen=True)
class Generate:
    """Completions of the current batch of `data` sampled from `model` (the plan's generation of
    that name says how): under no_grad, the model in eval mode, every rank taking part in every
    forward until all ranks' completions have ended."""

    kind: ClassVar[str] = "generate"
    id: int
    generation: str
    model: str
    data: str
    span: Span


@dataclass(frozen=True)
class ScoreReward:
    """A reward of every completion of the current rollouts of `generation`."""

    kind: ClassVar[str] = "reward"
    id: int
    call: str  # `correct(rollouts)`: read by RewardValue
    reward: str
    generation: str
    span: Span


StepOp: TypeAlias = NextBatch | ReadCache | Generate | ScoreReward | Forward | ComputeLoss | Backward | OptimizerStep


# -- the ops of one eval batch -------------------------------------------------------------------


@dataclass(frozen=True)
class EvalLoss:
    """The loss's value on an eval batch, with its terms and the statistics of built-in losses,
    weighted by the batch's samples (a padding batch by none)."""

    kind: ClassVar[str] = "eval_loss"
    id: int
    loss: str
    span: Span


EvalOp: TypeAlias = NextBatch | ReadCache | Forward | EvalLoss


# -- the precompute phase: hoisted calls, once per sample, before the loop ---------------------


@dataclass(frozen=True)
class FillCache:
    """The hoisted call over every sample of `data`, in micro batches (rank r takes batches r,
    r+W, ...; every rank joins every forward, the uneven end padded), under no_grad in eval mode;
    each of `entries` written by sample index. `rows` and `bytes`: what the compiler knows of
    the data set's size and the entries' rows (None: known at run time)."""

    kind: ClassVar[str] = "fill_cache"
    id: int
    call: str
    text: str
    model: str
    data: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...]
    entries: tuple[str, ...]
    rows: int | None
    bytes: int | None
    span: Span


@dataclass(frozen=True)
class ReleaseModel:
    """The model's engine destroyed and its memory released: nothing reads it after the
    precompute phase."""

    kind: ClassVar[str] = "release_model"
    id: int
    model: str
    span: Span


PrecomputeStep: TypeAlias = FillCache | ReleaseModel
