"""Evaluating the plan's expressions: model-call arguments and loss expressions, over one batch.

Values are looked up in a `Scope`: the current batch of every data set, the outputs of the model
calls made so far, and the losses computed so far. A call listed in `detach` is read detached,
so that one group's backward never reaches another group's models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dsgraph.runtime import builtins


@dataclass
class Scope:
    batches: dict[str, dict[str, Any]]
    calls: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    detach: frozenset[str] = frozenset()

    def call_output(self, key: str) -> Any:
        value = self.calls[key]
        return _detach(value) if key in self.detach else value


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return type(value)({k: _detach(v) for k, v in value.items()}) if type(value) is dict else \
            value.__class__(**{k: _detach(v) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def project(value: Any, attr: str) -> Any:
    """`out.logits`: an attribute, or a key of a dict-like output (Hugging Face ModelOutput)."""
    if isinstance(value, dict) and attr in value:
        return value[attr]
    if hasattr(value, attr):
        return getattr(value, attr)
    raise KeyError(f"the output has no field `{attr}` (it is a {type(value).__name__})")


def evaluate(expr: dict, scope: Scope, factories: Callable[[str], Callable]) -> Any:
    if "const" in expr:
        return expr["const"]
    if "field" in expr:
        data, name = expr["field"]
        batch = scope.batches[data]
        if name not in batch:
            raise KeyError(f"data set `{data}` has no field `{name}`; it has: {', '.join(batch)}")
        return batch[name]
    if "call" in expr:
        return scope.call_output(expr["call"])
    if "project" in expr:
        return project(evaluate(expr["of"], scope, factories), expr["project"])
    if "loss" in expr:
        return scope.losses[expr["loss"]]
    if "loss_fn" in expr:
        fn = builtins.LOSSES[expr["loss_fn"]] if expr["builtin"] else factories(expr["loss_fn"])
        args = [evaluate(a, scope, factories) for a in expr["args"]]
        kwargs = {k: evaluate(v, scope, factories) for k, v in expr["kwargs"].items()}
        return fn(*args, **kwargs)
    op = expr["op"]
    if op == "neg":
        return -evaluate(expr["operand"], scope, factories)
    left, right = evaluate(expr["left"], scope, factories), evaluate(expr["right"], scope, factories)
    return {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
            "/": lambda: left / right}[op]()
