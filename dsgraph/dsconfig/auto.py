"""`zero = auto`: the least-sharded ZeRO stage whose memory estimate fits the device (DSG415-417).

Runs between lowering and the graph, only for a file that says `zero = auto` somewhere: it sizes
every model of the file on the meta device (dsgraph.memory, which imports torch and calls the
models' builders, factories included), so that only such files pay for torch. Each auto model
gets an inline ZeRO config `<model>.zero` with the chosen stage (and offload) and the reason,
which the plan carries as `zero_auto`. Checks, configs and the plan then see an ordinary stage."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from typing import Any, TypeAlias

from dsgraph import ir
from dsgraph.diagnostics import Diagnostics, Note
from dsgraph.dsconfig import estimate as memory
from dsgraph.dsconfig.keys import zero_stage
from dsgraph.dsconfig.resolve import precision_of, resolve
from dsgraph.dsconfig.sizes import human
from dsgraph.dsconfig.zero import INLINE_DEFAULTS
from dsgraph.plan import SourceKind


Candidate: TypeAlias = tuple[int, bool, bool]  # (stage, offload_optimizer, offload_param)

# Least sharded first.
CANDIDATES: tuple[Candidate, ...] = (
    (0, False, False),
    (1, False, False),
    (2, False, False),
    (3, False, False),
    (3, True, False),
    (3, True, True),
)


def candidate_config(stage: int, off_opt: bool, off_param: bool) -> dict[str, Any]:
    """The `zero_optimization` of a candidate, as the inline block `{ stage = N ... }` gives it."""
    zero: dict[str, Any] = {"stage": stage}
    if off_opt:
        zero["offload_optimizer"] = {"device": "cpu"}
    if off_param:
        zero["offload_param"] = {"device": "cpu"}
    return zero


def candidates(trained: bool, shared_loss: bool) -> list[Candidate]:
    """Stages 1-2 shard nothing of a frozen model; a shared loss needs ZeRO >= 1 (DSG403)."""
    out = [c for c in CANDIDATES if trained or c[0] in (0, 3)]
    out = [c for c in out if trained or not c[1]]
    return [c for c in out if not (shared_loss and c[0] == 0)]


def has_auto(pipeline: ir.Pipeline) -> bool:
    return any(m.zero == ir.ZERO_AUTO for m in pipeline.models.values())


def _offload_words(candidate: Candidate) -> str:
    _, opt, param = candidate
    words = [w for w, on in (("optimizer", opt), ("parameters", param)) if on]
    return f" with {' and '.join(words)} offloaded to the CPU" if words else ""


def _name(candidate: Candidate) -> str:
    return f"ZeRO-{candidate[0]}{_offload_words(candidate)}"


def user_code(model: ir.Model) -> bool:
    """Whether building the model runs the user's code: a factory, or a Hugging Face model that
    trusts the code in its directory."""
    return model.source.kind is SourceKind.FACTORY or bool(model.source.arg("trust_remote_code", False))


def resolve_auto(
    p: ir.Pipeline, diags: Diagnostics, world_size: int | None, device_memory: int | None, trust_user_code: bool
) -> ir.Pipeline:
    """Each `zero = auto` model on the least-sharded stage that fits. Sizing builds every model
    on the meta device; a model built by user code is sized only when `trust_user_code` (`dsgraph
    run`, which runs that code anyway, or `compile --trust-user-code`): otherwise the choice is
    deferred (DSG418) and the plan shows ZeRO-3 meanwhile."""
    auto = [m for m in p.models.values() if m.zero == ir.ZERO_AUTO]
    unsized = [m for m in p.models.values() if user_code(m)]
    if unsized and not trust_user_code:
        for a in auto:
            culprit = a if a in unsized else unsized[0]  # itself, else the first that stops the sizing
            diags.add(
                "DSG418",
                a.spans["zero"],
                f"`zero = auto` on `{a.name}` is chosen when the run starts: `{culprit.name}` is built by "
                "user code, which compiling does not run; this plan shows ZeRO-3 meanwhile",
                "`dsgraph run` sizes it and chooses; `dsgraph compile --trust-user-code` shows that plan, "
                "or give the stage: `zero = { stage = 3 }`",
                *([Note(f"`{culprit.name}` is declared here", culprit.span)] if culprit is not a else []),
            )
        deferred = "zero = auto: ZeRO-3 until `dsgraph run` sizes the models built by user code"
        return _assign(p, {a.name: ((3, False, False), deferred) for a in auto})
    world = world_size or 1
    if world_size is None:
        for m in auto:
            diags.add(
                "DSG417",
                m.spans["zero"],
                f"`zero = auto` on `{m.name}` is planned for 1 process: the world size is not known",
                "pass `--world-size N` to `dsgraph compile` (`dsgraph run` plans for its --procs)",
            )
    trained = {name for t in p.trains for name in t.models}
    shared = {name for t in p.trains if len(t.models) > 1 for name in t.models}
    base = Path(p.file).parent
    from dsgraph.runtime.meta import budget as device_budget, count_elements  # torch, the models' builders

    counts: dict[str, memory.Counts] = {}
    for m in p.models.values():
        try:
            counts[m.name] = count_elements(m.source, base, m.lora, m.quantize)
        except Exception as error:
            for a in auto:
                notes = () if a is m else (Note(f"`{m.name}` is declared here", m.span),)
                diags.add(
                    "DSG416",
                    a.spans["zero"],
                    f"`zero = auto` needs the size of `{m.name}`, which could "
                    f"not be built on the meta device: {type(error).__name__}: {error}",
                    "fix the model's source, or give the stage: `zero = { stage = 3 }`",
                    *notes,
                )
            return _assign(p, {a.name: (CANDIDATES[-1], None) for a in auto})
    budget = device_budget(device_memory, world)

    def estimate(m: ir.Model, candidate: Candidate | None = None) -> memory.ModelEstimate:
        role = "trained" if m.name in trained else "frozen"
        config = resolve(p, m, role == "trained", world_size).config
        if candidate is not None:
            config["zero_optimization"] = candidate_config(*candidate)
        stage = candidate[0] if candidate is not None else zero_stage(config) or 0
        return memory.estimate_model(m.name, role, stage, precision_of(p, m).value, config, counts[m.name], world)

    fixed = [estimate(m) for m in p.models.values() if m.zero != ir.ZERO_AUTO]
    options = {m.name: candidates(m.name in trained, m.name in shared) for m in auto}
    at = dict.fromkeys(options, 0)
    current = {m.name: estimate(m, options[m.name][0]) for m in auto}
    tried: dict[str, list[str]] = {m.name: [] for m in auto}

    def totals() -> tuple[int, int]:
        every = fixed + list(current.values())
        return sum(e.total for e in every), sum(e.host_total for e in every)

    while not budget.fits(*totals()):
        movable = [n for n in sorted(at) if at[n] + 1 < len(options[n])]
        if not movable:
            device, host = totals()
            for m in auto:
                diags.add(
                    "DSG415",
                    m.spans["zero"],
                    f"`zero = auto`: nothing fits, not even ZeRO-3 with "
                    f"optimizer and parameters offloaded: {human(device)} per rank on the device"
                    f" and {human(host)} in host RAM, for {human(budget.device)} "
                    f"({budget.source}) and {human(budget.host)} of host RAM per rank",
                    "use more processes (--world-size), a smaller model or bf16, or a device with "
                    "more memory (--device-memory)",
                )
            return _assign(p, {m.name: (options[m.name][-1], None) for m in auto})
        name = max(movable, key=lambda n: current[n].total)  # the largest moves first
        tried[name].append(f"{human(current[name].total)} with {_name(options[name][at[name]])}")
        at[name] += 1
        current[name] = estimate(p.models[name], options[name][at[name]])
    device, host = totals()
    reasons = {}
    for m in auto:
        choice = options[m.name][at[m.name]]
        why = f"the least-sharded stage that fits: {human(device)} per rank for all models"
        why += f" (+{human(host)} in host RAM)" if host else ""
        why += f" within {human(budget.device)} ({budget.source}), world size {world}"
        if tried[m.name]:
            why += f"; this model alone would need {', '.join(tried[m.name])}"
        reasons[m.name] = (choice, f"zero = auto chose {_name(choice)}: {why}")
    return _assign(p, reasons)


def _assign(p: ir.Pipeline, chosen: Mapping[str, tuple[Candidate, str | None]]) -> ir.Pipeline:
    """The pipeline with each auto model on an inline config `<model>.zero` of its stage."""
    zeros, models = dict(p.zeros), dict(p.models)
    for name, ((stage, opt, param), reason) in chosen.items():
        m = p.models[name]
        zero = {**INLINE_DEFAULTS.get(stage, {}), **candidate_config(stage, opt, param)}
        span = m.spans["zero"]
        zeros[f"{name}.zero"] = ir.ZeroConfig(
            f"{name}.zero",
            {"zero_optimization": zero},
            None,
            None,
            {"zero_optimization.stage": span},
            span,
            auto=reason,
        )
        models[name] = dataclasses.replace(m, zero=f"{name}.zero")
    return dataclasses.replace(p, zeros=zeros, models=models)


# -- `gather = auto` on a generation ------------------------------------------------------------


def has_auto_gather(pipeline: ir.Pipeline) -> bool:
    return any(g.gather == "auto" for g in pipeline.generations.values())


def resolve_gather(
    p: ir.Pipeline, world_size: int | None, device_memory: int | None, trust_user_code: bool
) -> ir.Pipeline:
    """Each `gather = auto` generation as `once` or `layers`: a generator that ZeRO-3 does not
    partition has nothing to gather (`once`); a ZeRO-3 one is gathered once when the memory
    estimate of every model plus the generator's whole weights (less this rank's share) fits the
    device, else layer by layer. Sizing builds the models on the meta device (torch), as
    `zero = auto` does, and only for a ZeRO-3 generator; a model built by user code is sized only
    when `trust_user_code` (`dsgraph run`), the plan shows `once` until then."""
    trained = {name for t in p.trains for name in t.models}
    world = world_size or 1
    chosen: dict[str, tuple[ir.GatherMode, str]] = {}
    sharded = []
    for gen in p.generations.values():
        model = p.models.get(gen.model)
        if gen.gather != "auto" or model is None:
            continue
        stage = zero_stage(resolve(p, model, gen.model in trained, world_size).config)
        if stage != 3:
            chosen[gen.name] = ("once", f"gather = auto: `{gen.model}` is ZeRO-{stage}, whole on every rank")
        else:
            sharded.append(gen)
    if sharded and any(user_code(m) for m in p.models.values()) and not trust_user_code:
        for gen in sharded:
            chosen[gen.name] = ("once", "gather = auto: decided when `dsgraph run` sizes the models built by user code")
        sharded = []
    if sharded:
        from dsgraph.runtime.meta import budget as device_budget, count_elements  # torch, the models' builders

        base = Path(p.file).parent
        try:
            counts = {m.name: count_elements(m.source, base, m.lora, m.quantize) for m in p.models.values()}
        except Exception as error:  # a missing hf directory is DSG214, reported by the checks
            why = f"gather = auto: the models could not be sized ({type(error).__name__}), so once"
            chosen.update({gen.name: ("once", why) for gen in sharded})
            sharded = []
    if sharded:
        budget = device_budget(device_memory, world)
        held = []
        for m in p.models.values():
            config = resolve(p, m, m.name in trained, world_size).config
            role = "trained" if m.name in trained else "frozen"
            stage = zero_stage(config) or 0
            held.append(
                memory.estimate_model(m.name, role, stage, precision_of(p, m).value, config, counts[m.name], world)
            )
        total, host = sum(e.total for e in held), sum(e.host_total for e in held)
        for gen in sharded:
            extra = memory.gathered_bytes(next(e for e in held if e.name == gen.model))
            fits = budget.fits(total + extra, host)
            words = (
                f"{human(total)} per rank for all models + {human(extra)} for `{gen.model}` gathered whole "
                f"{'fits' if fits else 'does not fit'} {human(budget.device)} ({budget.source})"
            )
            chosen[gen.name] = ("once" if fits else "layers", f"gather = auto: {words}")
    generations = dict(p.generations)
    for name, (mode, why) in chosen.items():
        generations[name] = dataclasses.replace(generations[name], gather=mode, gather_reason=why)
    return dataclasses.replace(p, generations=generations)
