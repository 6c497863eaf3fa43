"""`dsgraph run --resume RUN_DIR`: which checkpoint of RUN_DIR this plan may continue, decided by
the driver before any worker starts, without torch. The newest valid checkpoint is taken (a newer
one that fails validation, see runtime/manifest.py, is skipped with a warning naming the file and
why); a plan that differs from the one that saved it is DSG501 at what changed; no valid
checkpoint is DSG502. Nothing of RUN_DIR is unpickled here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from dsgraph.compiler import Compilation
from dsgraph.diagnostics import Diagnostic, Note, diagnostic
from dsgraph.plan import Plan
from dsgraph.runtime import manifest as checkpoints
from dsgraph.source import Span


def check(run_dir: Path, plan: Plan, procs: int, result: Compilation) -> tuple[Path | None, list[Diagnostic]]:
    """(the manifest to resume from, or None; the diagnostics that refuse it)."""
    assert result.ir is not None
    pipeline = result.ir.span
    spans: dict[str, Span] = {"pipeline": pipeline}
    spans.update({f"model:{m.name}": m.span for m in plan.models})
    spans.update({f"loss:{loss.name}": loss.span for loss in plan.losses})
    spans.update({f"data:{d.name}": d.span for d in plan.data})
    spans.update({f"setting:{key}": span for key, span in result.ir.settings.spans.items()})
    help = "resume a run directory that `dsgraph run` checkpointed (checkpoint_every > 0), or start a new run"
    if not os.path.lexists(run_dir):
        return None, [diagnostic("DSG502", pipeline, f"{run_dir} does not exist", help)]
    try:
        manifest, path, skipped = checkpoints.newest(run_dir)
    except checkpoints.CheckpointInvalid as error:
        return None, [diagnostic("DSG502", pipeline, f"{run_dir} holds no valid dsgraph checkpoint: {error}", help)]
    current = checkpoints.identity(plan)  # reads every data file once, for its digest
    spans.update(_model_key_spans(result, current, manifest.identity))
    for warning in skipped:
        print(f"dsgraph: warning: skipping the checkpoint {warning}; using an older one", file=sys.stderr)
    where = Note(f"checkpoint: {path}")
    diags = [
        diagnostic(
            "DSG501",
            spans.get(concerns, pipeline),
            f"the checkpoint at step {manifest.step} was saved by a different plan: {message}",
            "resume with the file the run was started with, or start a new run",
            where,
        )
        for message, concerns in checkpoints.differences(manifest.identity, current)
    ]
    if manifest.world_size != procs:
        diags.append(
            diagnostic(
                "DSG501",
                pipeline,
                f"the checkpoint was saved by {manifest.world_size} processes, this run has {procs}",
                f"resume with --procs {manifest.world_size}",
                where,
            )
        )
    steps = plan.settings.steps
    if steps is not None and steps < manifest.step:
        diags.append(
            diagnostic(
                "DSG501",
                spans.get("setting:steps", pipeline),
                f"the checkpoint is at step {manifest.step}, past `steps = {steps}`: nothing would be left to run",
                f"resume with `steps` above {manifest.step} (e.g. `--set steps={manifest.step * 2}`)",
                where,
            )
        )
    return (None if diags else path), diags


# A DeepSpeed config key of a model, and the model property that sets it.
_PROPERTY_OF_KEY = (
    ("optimizer", "optimizer"),
    ("scheduler", "scheduler"),
    ("gradient_clipping", "clip"),
    ("fp16", "precision"),
    ("bf16", "precision"),
)


def _model_key_spans(result: Compilation, current: dict[str, Any], saved: dict[str, Any]) -> dict[str, Span]:
    """`model:NAME:KEY` -> where that key of the model is written: the `--set` that gave it, else
    its key in the ZeRO config (inline or a JSON file), else the model property, else the model."""
    assert result.ir is not None
    overrides = []  # (key, span of the key), in command-line order
    for name, source in result.sources.items():
        if name.startswith("--set["):
            key = source.text.partition("=")[0].strip()
            overrides.append((key, source.span_at(0, len(key))))
    out: dict[str, Span] = {}
    for name, model in result.ir.models.items():
        before, now = (saved.get("models") or {}).get(name), current["models"].get(name)
        if not isinstance(before, dict) or now is None:
            continue
        keys = ["source", "role", *checkpoints.changed_keys(before.get("deepspeed_config"), now["deepspeed_config"])]
        for key in keys:
            prop = {"source": "source", "role": "frozen"}.get(key) or next(
                (p for prefix, p in _PROPERTY_OF_KEY if key == prefix or key.startswith(prefix + ".")), "zero"
            )
            given = [span for k, span in overrides if k == f"{name}.{prop}" or k.startswith(f"{name}.{prop}.")]
            zero = result.ir.zeros.get(model.zero) if model.zero else None
            if given:
                out[f"model:{name}:{key}"] = given[-1]
            elif prop == "zero" and zero is not None:
                out[f"model:{name}:{key}"] = zero.span_of(key)
            elif prop == "precision" and prop not in model.spans and "precision" in result.ir.settings.spans:
                out[f"model:{name}:{key}"] = result.ir.settings.spans["precision"]
            else:
                out[f"model:{name}:{key}"] = model.spans.get(prop, model.span)
    return out
