"""`dsgraph run --resume RUN_DIR`: which checkpoint of RUN_DIR this plan may continue, decided by
the driver before any worker starts, without torch. The newest valid checkpoint is taken (a newer
one that fails validation is skipped with a warning naming the file and why; dsgraph.runtime.
manifest); a plan that differs from the one that saved it is DSG501 at the line that changed; no
valid checkpoint is DSG502. Nothing of RUN_DIR is unpickled here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
        for message, concerns in checkpoints.differences(manifest.identity, checkpoints.identity(plan))
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
