"""Sources of models and data sets to `plan.Source`: built-ins, factories and Hugging Face models."""

from __future__ import annotations

from typing import Any

from dsgraph import catalogue
from dsgraph.diagnostics import Diagnostics, did_you_mean
from dsgraph.lower.values import INVALID, bind_args, describe, to_python
from dsgraph.plan import Source, SourceKind
from dsgraph.source import Span
from dsgraph.syntax import ast


def _keyword_span(node: ast.Source, name: str) -> Span:
    return next(a.value.span for a in node.args if a.name and a.name.text == name)


def lower_source(node: ast.Source, table: dict[str, catalogue.Builtin], kind: str, diags: Diagnostics) -> Source | None:
    """Where a model or data set comes from: `builtin.NAME(...)` bound against the catalogue,
    `package.module:function(...)` or `hf(...)` (DSG203-DSG206, DSG209, DSG213)."""
    if node.factory is not None:
        args = _free_args(node.args, diags)
        return Source(SourceKind.FACTORY, node.factory, args, node.span) if args is not None else None
    path = [n.text for n in node.path]
    if path == ["hf"] and kind == "model":
        args = _free_args(node.args, diags)
        if args is None:
            return None
        if not args or not ((args[0][0] == "0" and isinstance(args[0][1], str)) or any(k == "config" for k, _ in args)):
            diags.add(
                "DSG205",
                node.span,
                "`hf` needs a local directory or a config",
                'write `hf("path/to/model")` or `hf(config="config.json")`',
            )
            return None
        named = dict(args)
        if "task" in named and named["task"] not in catalogue.HF_TASKS:
            diags.add(
                "DSG209",
                _keyword_span(node, "task"),
                f"hf task must be one of {', '.join(catalogue.HF_TASKS)}, not {describe(named['task'])}",
                "leave `task` out to use the class the model's "
                'config names (its "architectures"), or write e.g. `task="causal_lm"`',
            )
            return None
        if isinstance(named.get("config"), dict) and "model_type" not in named["config"]:
            diags.add(
                "DSG205",
                _keyword_span(node, "config"),
                "`hf(config={...})` needs a `model_type`",
                'add e.g. `model_type = "gpt2"`: Transformers picks the config class from it',
            )
            return None
        target = named.get("0", named.get("config"))
        return Source(SourceKind.HF, target if isinstance(target, str) else "config", args, node.span)
    if len(path) == 2 and path[0] == "builtin":
        spec = table.get(path[1])
        if spec is None:
            diags.add(
                "DSG206",
                node.path[1].span,
                f"there is no built-in {kind} `{path[1]}`{did_you_mean(path[1], table)}",
                f"the built-in {kind}s are: {', '.join(table)}",
            )
            return None
        bound = bind_args(spec, kind, node.args, node.span, diags)
        if bound is None:
            return None
        return Source(SourceKind.BUILTIN, spec.name, tuple(sorted(bound.items())), node.span)
    written = ".".join(path)
    diags.add(
        "DSG213",
        node.span,
        f"`{written}(...)` is not a {kind} source",
        f"write `builtin.NAME(...)`, `package.module:function(...)`{' or `hf(...)`' if kind == 'model' else ''}",
    )
    return None


def _free_args(args: tuple[ast.Arg[ast.Value], ...], diags: Diagnostics) -> tuple[tuple[str, Any], ...] | None:
    """A factory's or hf's arguments as they are written: nothing to bind them against."""
    out, ok = [], True
    for i, arg in enumerate(args):
        value = to_python(arg.value, diags)
        ok = ok and value is not INVALID
        out.append((arg.name.text if arg.name else str(i), value))
    return tuple(out) if ok else None
