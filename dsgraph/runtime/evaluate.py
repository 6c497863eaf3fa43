"""Evaluating the plan's expressions (model-call arguments and loss terms) over one micro batch.

Values are looked up in a `Scope`: the current batch of every data set, the outputs of the model
calls made so far (by call id), the cached rows read for the batch (by cache entry), the rollouts
generated and the rewards scored in this micro step, and the losses of the current train group. A call listed in
`detach` is read detached, so that one group's backward never reaches another group's models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dsgraph import plan as P
from dsgraph.compat import assert_never
from dsgraph.runtime import builtins
from dsgraph.runtime.generation import Rollouts

Factories = Callable[[str], Callable[..., Any]]


@dataclass
class Scope:
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    cached: dict[str, Any] = field(default_factory=dict)  # cache entry -> the batch's rows
    indices: dict[str, Any] = field(default_factory=dict)  # data set -> the batch's sample indices
    rollouts: dict[str, Rollouts] = field(default_factory=dict)  # generation -> this micro step's
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)  # `correct(rollouts)` -> [N, 1]


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return (
            type(value)({k: detached(v) for k, v in value.items()})
            if type(value) is dict
            else value.__class__(**{k: detached(v) for k, v in value.items()})
        )
    if isinstance(value, (tuple, list)):
        return type(value)(detached(v) for v in value)
    return value


def project(value: Any, attr: str) -> Any:
    """`out.logits`: an attribute, or a key of a dict-like output (Hugging Face ModelOutput)."""
    if isinstance(value, dict) and attr in value:
        return value[attr]
    if hasattr(value, attr):
        return getattr(value, attr)
    raise KeyError(f"the output has no field `{attr}` (it is a {type(value).__name__})")


def evaluate(expr: P.Expr, scope: Scope, detach: tuple[str, ...], factories: Factories) -> Any:
    # Several calls per micro step: exact type tests, the commonest kinds first, cost half of a
    # `match` on class patterns here; the expression classes are final, so mypy still checks that
    # every kind is handled.
    if type(expr) is P.CallOutput:
        call = expr.call
        return detached(scope.calls[call]) if call in detach else scope.calls[call]
    if type(expr) is P.Field:
        batch = scope.batches[expr.data]
        if expr.field not in batch:
            raise KeyError(f"data set `{expr.data}` has no field `{expr.field}`; it has: {', '.join(batch)}")
        return batch[expr.field]
    if type(expr) is P.LossCall:
        function = builtins.LOSSES[expr.fn] if expr.builtin else factories(expr.fn)
        values = [evaluate(a, scope, detach, factories) for a in expr.args]
        options = {k: evaluate(v, scope, detach, factories) for k, v in expr.kwargs}
        return function(*values, **options)
    if type(expr) is P.Const:
        return expr.value
    if type(expr) is P.Attr:
        return project(evaluate(expr.of, scope, detach, factories), expr.name)
    if type(expr) is P.LossValue:
        return scope.losses[expr.loss]
    if type(expr) is P.Neg:
        return -evaluate(expr.operand, scope, detach, factories)
    if type(expr) is P.BinOp:
        a, b = evaluate(expr.left, scope, detach, factories), evaluate(expr.right, scope, detach, factories)
        if expr.op == "+":
            return a + b
        if expr.op == "-":
            return a - b
        if expr.op == "*":
            return a * b
        return a / b
    if type(expr) is P.Cached:
        return scope.cached[expr.entry]
    if type(expr) is P.Generated:
        rollouts = scope.rollouts[expr.generation]
        return rollouts if expr.field is None else rollouts.field(expr.field)
    if type(expr) is P.RewardValue:
        return scope.rewards[expr.call]
    assert_never(expr)
