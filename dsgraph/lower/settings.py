"""Pipeline settings (`steps = 100`, `micro_batch = 16`, ...) to `ir.Settings`."""

from __future__ import annotations

from typing import Any

from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.lower.values import INVALID, check_type, describe, to_python
from dsgraph.plan import Precision
from dsgraph.source import Span
from dsgraph.syntax import ast


def lower_settings(nodes: list[ast.Setting], pipeline: ast.Pipeline, diags: Diagnostics) -> ir.Settings | None:
    """The pipeline's settings, typed and checked, defaults filled (DSG207-DSG210); None when any
    is wrong or a required one is missing."""
    values: dict[str, Any] = {}
    spans: dict[str, Span] = {}
    for node in nodes:
        key = node.name.text
        spec = catalogue.SETTINGS.get(key)
        if spec is None:
            diags.add(
                "DSG207",
                node.name.span,
                f"`{key}` is not a pipeline setting{did_you_mean(key, catalogue.SETTINGS)}",
                f"the settings are: {', '.join(catalogue.SETTINGS)}",
            )
            continue
        if key in values:
            diags.add(
                "DSG208",
                node.name.span,
                f"setting `{key}` is given twice",
                "keep one of them",
                Note("first given here", spans[key]),
            )
            continue
        value = to_python(node.value, diags)
        if value is INVALID or not check_type(spec.type, value, node.value.span, f"`{key}`", diags):
            values[key] = INVALID
            continue
        if key == "track":
            unknown = [v for v in value if v not in catalogue.TRACKERS]
            if unknown or len(set(value)) != len(value):
                what = (
                    f"there is no tracker `{unknown[0]}`{did_you_mean(unknown[0], catalogue.TRACKERS)}"
                    if unknown
                    else "a tracker is named twice"
                )
                diags.add(
                    "DSG209",
                    node.value.span,
                    what,
                    f"the trackers are: {', '.join(catalogue.TRACKERS)} (metrics.jsonl is always written)",
                )
                values[key] = INVALID
                continue
        if key == "precision" and value not in catalogue.PRECISIONS:
            diags.add(
                "DSG209",
                node.value.span,
                f"precision must be one of {', '.join(catalogue.PRECISIONS)}, not {describe(value)}",
                "write `precision = bf16`",
            )
            values[key] = INVALID
            continue
        minimum = 0 if key in ("seed", "checkpoint_every", "eval_every", "cache_budget") else 1
        if spec.type in ("int", "float") and value < minimum:
            diags.add(
                "DSG209",
                node.value.span,
                f"`{key}` must be at least {minimum}, not {value}",
                f"write a whole number of {minimum} or more",
            )
            values[key] = INVALID
            continue
        values[key], spans[key] = value, node.span
    if "steps" in spans and "epochs" in spans:
        diags.add(
            "DSG209",
            spans["epochs"],
            "`steps` and `epochs` are both given",
            "give one: `steps` counts optimizer steps, `epochs` passes over the data",
            Note("steps given here", spans["steps"]),
        )
    for required, why in (("micro_batch", "`micro_batch = 8` (samples per process per step)"),):
        if required not in values:
            diags.add(
                "DSG210", pipeline.name.span, f"pipeline `{pipeline.name.text}` has no `{required}`", f"add {why}"
            )
    if "steps" not in values and "epochs" not in values:
        diags.add(
            "DSG210",
            pipeline.name.span,
            f"pipeline `{pipeline.name.text}` says neither `steps` nor `epochs`",
            "add `steps = 100` or `epochs = 1`",
        )
    if (
        any(v is INVALID for v in values.values())
        or "micro_batch" not in values
        or ("steps" not in values and "epochs" not in values)
    ):
        return None

    def get(key: str) -> Any:
        return values.get(key, catalogue.SETTINGS[key].default)

    return ir.Settings(
        get("seed"),
        get("steps"),
        get("epochs"),
        get("micro_batch"),
        get("grad_accum"),
        get("log_every"),
        get("checkpoint_every"),
        Precision(get("precision")),
        get("eval_every"),
        tuple(get("track")),
        get("rank_metrics"),
        get("cache_dir"),
        float(get("cache_budget")),
        spans,
    )
