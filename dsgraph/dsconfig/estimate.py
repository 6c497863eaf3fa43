"""The memory estimate (`dsgraph compile --memory`, `zero = auto`): per model and per rank, the
bytes of parameters, gradients and optimizer states that DeepSpeed keeps for the model's ZeRO
stage, offload, precision and role, computed from the plan and the model's element counts.

The element counts come from building each model on the meta device with the runtime's own
builders (dsgraph.runtime.meta: no weights are read or allocated); this module imports no torch.
The rules below were read off DeepSpeed 0.19.8 (runtime/zero/stage_1_and_2.py, stage3.py,
engine.py) and held against what the runtime
measures (tests/test_memory.py). They describe the state as an optimizer step begins: the
step's gradients are reduced and the optimizer states exist. Not counted: activations,
communication buckets, temporary copies, the allocator's cache, the CUDA context."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from dsgraph.dsconfig.sizes import human
from dsgraph.plan import Plan

FP32 = 4
_PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer states per trained element, each fp32 (DeepSpeed's config names; SGD: see _states).
_STATES = {
    "adam": 2,
    "adamw": 2,
    "lamb": 2,
    "onebitadam": 2,
    "zerooneadam": 2,
    "onebitlamb": 2,
    "adagrad": 1,
    "rmsprop": 1,
    "muadam": 2,
    "muadamw": 2,
    "musgd": 1,
}


# -- element counts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """Elements of each parameter tensor of a built model, all and trainable ones (LoRA: the
    adapter's). `quantized`: the elements of each weight loaded in 4 bits (`quantize`), among
    `sizes` as if unquantized; `quant_state`: the bytes of their quantization constants."""

    sizes: tuple[int, ...]
    trainable: tuple[int, ...]
    quantized: tuple[int, ...] = ()
    quant_state: int = 0

    @property
    def total(self) -> int:
        return sum(self.sizes)


def packed_elements(n: int, element_bytes: int) -> int:
    """A 4-bit weight of n elements, packed two to a byte into elements of `element_bytes` (the
    storage dtype: dsgraph packs into the model's precision)."""
    return math.ceil(math.ceil(n / 2) / element_bytes)


def quant_state_bytes(n: int, double_quant: bool = True) -> int:
    """The quantization constants of a 4-bit weight of n elements (bitsandbytes' QuantState,
    blocks of 64): not a parameter, so whole on every rank. With double quant: one uint8 scale
    per block, the fp32 scales of those per 256 blocks, both code books (256 and 16 fp32) and an
    fp32 offset; without: one fp32 scale per block and the 16-entry code book."""
    blocks = math.ceil(n / 64)
    if double_quant:
        return blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 * 16 + 4
    return 4 * blocks + 4 * 16


# -- the rules ----------------------------------------------------------------------------------


@dataclass
class ModelEstimate:
    name: str
    role: str
    stage: int
    precision: str
    offload: str  # none, optimizer, param, optimizer+param
    optimizer: str | None
    elements: int
    trainable: int
    params: int  # bytes on each rank's device
    grads: int
    optimizer_states: int
    host: dict[str, int] = field(default_factory=dict)  # offloaded bytes per category, host RAM
    zero_auto: str | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_states

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "host_total": self.host_total}


def _states(optimizer: dict[str, Any] | None) -> int:
    if not optimizer:
        return 0
    kind = str(optimizer.get("type", "")).lower()
    if kind == "sgd":
        return 1 if float(optimizer.get("params", {}).get("momentum", 0) or 0) else 0
    return _STATES.get(kind, 2)  # an unknown optimizer: counted like Adam


def _offload(zero: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the optimizer states and the parameters are offloaded."""

    def device(key: str) -> str:
        block = zero.get(key)
        return str(block.get("device", "none")) if isinstance(block, dict) else "none"

    return device("offload_optimizer") != "none", device("offload_param") != "none"


def estimate_model(
    name: str, role: str, stage: int, precision: str, config: dict[str, Any], counts: Counts, world: int
) -> ModelEstimate:
    """Bytes per rank of one model (every rank holds the same: DeepSpeed pads the partitions)."""
    zero = config.get("zero_optimization", {})
    off_opt, off_param = _offload(zero)
    trained = role == "trained"
    pb = _PRECISION_BYTES[precision]
    mixed = pb != FP32

    def part(n: int) -> int:  # this rank's share of n elements
        return math.ceil(n / world)

    host = {"params": 0, "grads": 0, "optimizer_states": 0}
    # 4-bit weights (`quantize`): n/2 bytes whatever the storage dtype, held like any parameter
    # of that dtype; their quantization constants, not parameters, whole on every rank.
    plain = list(counts.sizes)
    for n in counts.quantized:
        plain.remove(n)
    packed = [packed_elements(n, pb) for n in counts.quantized]
    if stage == 3:
        # Every tensor is split (DeepSpeed pads each to a multiple of the world size). Measured:
        # stage3_param_persistence_threshold kept no tensor whole in these runs; not modelled.
        params = sum(part(n) for n in plain + packed) * pb
        local_trained = sum(part(n) for n in counts.trainable)
    else:
        params = (sum(plain) + sum(packed)) * pb
        local_trained = part(sum(counts.trainable)) if stage else sum(counts.trainable)
    grads = opt = 0
    optimizer = config.get("optimizer")
    if trained:
        # Gradients ready for the step, in the model's dtype: ZeRO-0 keeps them whole; ZeRO-1/2
        # reduce them into this rank's partition by the end of backward (ZeRO-1 holds them whole
        # until then); ZeRO-3 keeps a flat partition buffer.
        grads = local_trained * pb
        # An fp32 master copy of the trained partition: ZeRO-1/2/3 keep one even in fp32 (measured:
        # a clone of the partition); ZeRO-0 only for bf16/fp16 (DeepSpeed's BF16/FP16 optimizer).
        master = local_trained * FP32 if (stage >= 1 or mixed) else 0
        opt = master + _states(optimizer) * local_trained * FP32
    if off_param and stage == 3:
        host["params"], params = params, 0
    params += counts.quant_state  # not a parameter, so not offloaded with them (unmeasured on a GPU)
    if off_opt and stage >= 1 and trained:
        host["optimizer_states"], opt = opt, 0
        host["grads"] = local_trained * FP32  # the fp32 gradient partition the CPU optimizer reads
        grads = 0 if stage >= 2 else grads
    offload = "+".join(k for k, on in (("optimizer", off_opt), ("param", off_param)) if on) or "none"
    kind = optimizer.get("type") if optimizer and trained else None
    return ModelEstimate(
        name,
        role,
        stage,
        precision,
        offload,
        kind,
        counts.total,
        sum(counts.trainable) if trained else 0,
        params,
        grads,
        opt,
        {k: v for k, v in host.items() if v},
    )


def gathered_bytes(model: ModelEstimate) -> int:
    """What gathering a ZeRO-3 model's whole weights adds on each rank: the model, less the
    partition the rank holds already (on the device or offloaded)."""
    return model.elements * _PRECISION_BYTES[model.precision] - model.params - model.host.get("params", 0)


# -- the estimate of a plan ---------------------------------------------------------------------


@dataclass
class Estimate:
    pipeline: str
    world_size: int
    models: list[ModelEstimate]
    device_memory: int | None = None
    device_source: str | None = None
    released: tuple[str, ...] = ()  # cached models, released after the precompute phase
    # ZeRO-3 generators whose weights a generation gathers once: model -> the bytes beyond its
    # own partition that each rank holds while it generates (the whole model, less its share)
    gathered: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """The peak: every model is built (and held) during the setup and the precompute."""
        return sum(m.total for m in self.models)

    @property
    def training_total(self) -> int:
        """During the loop: the released models' memory is given back."""
        return sum(m.total for m in self.models if m.name not in self.released)

    @property
    def generation_total(self) -> int:
        """While a generation runs: the loop's models, and the largest gathered copy (one
        generation runs at a time; its copy is released when it ends)."""
        return self.training_total + max(self.gathered.values(), default=0)

    @property
    def peak(self) -> int:
        return max(self.total, self.generation_total)

    @property
    def host_total(self) -> int:
        return sum(m.host_total for m in self.models)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak <= self.device_memory

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "world_size": self.world_size,
            "per_rank": True,
            "models": [m.to_json() for m in self.models],
            "total": self.total,
            "host_total": self.host_total,
            "device_memory": self.device_memory,
            "device_source": self.device_source,
            "fits": self.fits,
            "phases": {
                "precompute": self.total,
                "training": self.training_total,
                "released": list(self.released),
                "generation": self.generation_total,
                "gathered": self.gathered,
            },
        }

    def to_text(self) -> str:
        rows = [["model", "role", "zero", "precision", "offload", "params", "grads", "optim states", "total/rank"]]
        for m in self.models:
            rows.append(
                [
                    m.name,
                    m.role,
                    f"stage {m.stage}",
                    m.precision,
                    m.offload,
                    human(m.params),
                    human(m.grads),
                    human(m.optimizer_states),
                    human(m.total),
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = set(range(5, 9))
        lines = [f"memory estimate of {self.pipeline}, per rank, world size {self.world_size}"]
        lines += [
            "  "
            + "  ".join(
                c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
            for r in rows
        ]
        lines.append(f"  total per device: {human(self.total)} ({self.total} bytes)")
        if self.released:
            freed = self.total - self.training_total
            names = ", ".join(self.released)
            lines.append(f"    during the precompute: {human(self.total)} (every model built)")
            lines.append(
                f"    during training:       {human(self.training_total)} ({self.training_total} bytes; "
                f"{names} released before the loop: {human(freed)} freed per rank)"
            )
        if self.gathered:
            names = ", ".join(f"{name} +{human(extra)}" for name, extra in sorted(self.gathered.items()))
            lines.append(
                f"    during generation:     {human(self.generation_total)} ({self.generation_total} bytes; "
                f"ZeRO-3 weights gathered once: {names} per rank; `gather = layers` holds one layer at a time)"
            )
        if self.host_total:
            lines.append(f"  offloaded to host RAM, per rank: {human(self.host_total)}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  device memory: {human(self.device_memory)} ({self.device_source}): {verdict}")
        for m in self.models:
            if m.zero_auto:
                lines.append(f"  {m.name}: {m.zero_auto}")
        lines.append(
            "  counted: parameters, gradients and optimizer states as a step begins; not counted: "
            "activations, communication buckets, temporary copies, the CUDA context"
        )
        return "\n".join(lines) + "\n"


def estimate(plan: Plan, counts: Mapping[str, Counts], world_size: int | None = None) -> Estimate:
    """The estimate of every model of a plan, per rank of `world_size` (default: the plan's, else
    1), from each model's element counts (dsgraph.runtime.meta.count_plan)."""
    world = world_size or plan.world_size or 1
    models = []
    for m in plan.models:
        config = m.deepspeed_config
        if m.client_optimizer is not None:  # its states are unknown here: counted like Adam's
            config = {**config, "optimizer": {"type": m.client_optimizer.target}}
        est = estimate_model(m.name, m.role.value, m.stage, m.precision.value, config, counts[m.name], world)
        est.zero_auto = m.zero_auto
        models.append(est)
    released = plan.precompute.released if plan.precompute else ()
    gathered: dict[str, int] = {}
    for gen in plan.generations:
        if gen.gather == "once" and plan.model(gen.model).stage == 3:
            gathered[gen.model] = gathered_bytes(next(m for m in models if m.name == gen.model))
    return Estimate(plan.pipeline, world, models, released=released, gathered=gathered)


# -- how much memory there is -------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Bytes one rank may use on its device and in host RAM; `shared` when they are one memory
    (no accelerator: offloading to the CPU frees nothing)."""

    device: int
    host: int
    shared: bool
    source: str

    def fits(self, device: int, host: int) -> bool:
        if self.shared:
            return device + host <= self.device
        return device <= self.device and host <= self.host


def attach_budget(est: Estimate, budget: Budget) -> Estimate:
    est.device_memory, est.device_source = budget.device, budget.source
    return est
