"""Evaluating the plan's expressions (model-call arguments and loss terms) over one micro batch.

Values are looked up in a `Scope`: the current batch of every data set, the outputs of the model
calls made so far (by call id) and the losses of the current train group. A call listed in
`detach` is read detached, so that one group's backward never reaches another group's models."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, assert_never

import torch

from dsgraph import plan as P
from dsgraph.runtime import builtins

Factories = Callable[[str], Callable[..., Any]]


@dataclass
class Scope:
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


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
    match expr:
        case P.Const(value=value):
            return value
        case P.Field(data=data, field=name):
            batch = scope.batches[data]
            if name not in batch:
                raise KeyError(f"data set `{data}` has no field `{name}`; it has: {', '.join(batch)}")
            return batch[name]
        case P.CallOutput(call=call):
            return detached(scope.calls[call]) if call in detach else scope.calls[call]
        case P.Attr(of=of, name=name):
            return project(evaluate(of, scope, detach, factories), name)
        case P.LossValue(loss=loss):
            return scope.losses[loss]
        case P.LossCall(fn=fn, builtin=builtin, args=args, kwargs=kwargs):
            function = builtins.LOSSES[fn] if builtin else factories(fn)
            return function(
                *(evaluate(a, scope, detach, factories) for a in args),
                **{k: evaluate(v, scope, detach, factories) for k, v in kwargs},
            )
        case P.Neg(operand=operand):
            return -evaluate(operand, scope, detach, factories)
        case P.BinOp(op=op, left=left, right=right):
            a, b = evaluate(left, scope, detach, factories), evaluate(right, scope, detach, factories)
            if op == "+":
                return a + b
            if op == "-":
                return a - b
            if op == "*":
                return a * b
            return a / b
        case _:
            assert_never(expr)
