"""How each group runs: Accelerate's multi-plugin API, or native `deepspeed.initialize` engines.

Accelerate holds one trained engine per Accelerator and one `mixed_precision` for all of them,
and treats models prepared together as completely disjoint. So: a group of one trained model runs
on its own Accelerator; a shared loss (one backward into several engines) and per-model precision
need native engines. Frozen models follow the first Accelerator when there is one."""

from __future__ import annotations

from dataclasses import dataclass

from dsgraph import ir
from dsgraph.analysis import Analysis, Role
from dsgraph.dsconfig.resolve import precision_of
from dsgraph.plan import Engine


@dataclass(frozen=True)
class Decision:
    engine: Engine
    reason: str
    forced: bool = False  # by `engine = ...` in the file, not chosen


@dataclass(frozen=True)
class Strategy:
    groups: dict[int, Decision]
    frozen: Decision | None  # for all frozen models
    accelerator_of: dict[str, int]  # model -> accelerator index (Accelerate models only)

    def engine_of(self, model: str, analysis: Analysis) -> Engine:
        group = analysis.group_of_model.get(model)
        if group is not None and analysis.roles[model] is Role.TRAINED:
            return self.groups[group].engine
        return self.frozen.engine if self.frozen else Engine.DEEPSPEED


def forced_engine(pipeline: ir.Pipeline, models: list[str] | tuple[str, ...]) -> Engine | None:
    """The engine `engine = ...` forces on these models (None: none, or they disagree: DSG419)."""
    forced = {pipeline.models[m].engine for m in models} - {None}
    return forced.pop() if len(forced) == 1 else None


def _words(engine: Engine) -> str:
    return "`engine = native`" if engine is Engine.DEEPSPEED else "`engine = accelerate`"


def decide(pipeline: ir.Pipeline, analysis: Analysis) -> Strategy:
    """Chosen as the module says, unless the file forces an engine (`engine = ...`); a forced
    engine that cannot do the job is kept out here and reported by the checks (DSG419)."""
    frozen = sorted(m for m, r in analysis.roles.items() if r is Role.FROZEN)
    frozen_forced = forced_engine(pipeline, frozen)
    forced = {g.index: forced_engine(pipeline, g.models) for g in analysis.groups}
    single = [g for g in analysis.groups if not g.shared and forced[g.index] is not Engine.DEEPSPEED]
    candidates = [m for g in single for m in g.models] + (frozen if frozen_forced is not Engine.DEEPSPEED else [])
    precisions = sorted({precision_of(pipeline, pipeline.models[m]).value for m in candidates})
    mixed = len(precisions) > 1
    groups: dict[int, Decision] = {}
    for group in analysis.groups:
        engine = forced[group.index]
        if engine is Engine.DEEPSPEED:
            groups[group.index] = Decision(Engine.DEEPSPEED, f"forced: {_words(engine)}", True)
        elif group.shared:
            groups[group.index] = Decision(
                Engine.DEEPSPEED,
                "shared loss: one backward must reach "
                f"{len(group.models)} engines; Accelerate treats models as disjoint",
            )
        elif mixed and engine is None:
            groups[group.index] = Decision(
                Engine.DEEPSPEED, f"per-model precision ({', '.join(precisions)}): Accelerate has one mixed_precision"
            )
        elif engine is Engine.ACCELERATE:
            groups[group.index] = Decision(Engine.ACCELERATE, f"forced: {_words(engine)}; its own Accelerator", True)
        else:
            groups[group.index] = Decision(
                Engine.ACCELERATE, "one trained model: its own Accelerator with its plugin selected"
            )
    accelerate_groups = [g for g in analysis.groups if groups[g.index].engine is Engine.ACCELERATE]
    accelerator_of = {g.models[0]: i for i, g in enumerate(accelerate_groups)}
    frozen_decision = None
    if frozen:
        if frozen_forced is Engine.DEEPSPEED:
            frozen_decision = Decision(Engine.DEEPSPEED, f"forced: {_words(frozen_forced)}", True)
        elif accelerate_groups:
            reason = "prepared for inference by the first Accelerator, with its own plugin selected"
            forced_here = frozen_forced is Engine.ACCELERATE
            frozen_decision = Decision(Engine.ACCELERATE, ("forced: " if forced_here else "") + reason, forced_here)
            accelerator_of.update({m: 0 for m in frozen})
        else:
            why = "per-model precision" if mixed else "no Accelerator in this pipeline"
            frozen_decision = Decision(Engine.DEEPSPEED, f"inference engines of their own ({why})")
    return Strategy(groups, frozen_decision, accelerator_of)
