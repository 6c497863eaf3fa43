"""The memory estimate (`dsgraph compile --memory`, `zero = auto`): per model and per rank, the
bytes of parameters, gradients and optimizer states that DeepSpeed keeps for the model's ZeRO
stage, offload, precision and role, computed from the plan's JSON and the model's element counts.

The element counts come from building each model on the meta device with the runtime's own
builders (no weights are read or allocated). This module imports torch only in `count_elements`;
the normal compile path does not import it at all. The rules below were read off DeepSpeed
0.19.8 (runtime/zero/stage_1_and_2.py, stage3.py, engine.py) and held against what the runtime
measures (tests/test_memory.py). They describe the state as an optimizer step begins: the
step's gradients are reduced and the optimizer states exist. Not counted: activations,
communication buckets, temporary copies, the allocator's cache, the CUDA context."""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FP32 = 4
_PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Optimizer states per trained element, each fp32 (DeepSpeed's config names; SGD: see _states).
_STATES = {"adam": 2, "adamw": 2, "lamb": 2, "onebitadam": 2, "zerooneadam": 2, "onebitlamb": 2,
           "adagrad": 1, "rmsprop": 1, "muadam": 2, "muadamw": 2, "musgd": 1}


# -- sizes --------------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """`16GiB`, `24e9`, `512 MiB`, `1.5GB`, `1000000` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match[2].lower()
    if not match or unit not in _UNITS:
        raise ValueError(f"expected a size such as 16GiB, 24e9 or 512MB, got {text!r}")
    value = float(match[1]) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"a memory size must be at least 1 byte, got {text!r}")
    return int(value)


def human(n: int | float) -> str:
    """Bytes in binary units: `512 B`, `3.2 KiB`, `1.50 GiB`."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# -- element counts (torch, meta device) --------------------------------------------------------

@dataclass(frozen=True)
class Counts:
    """Elements of each parameter tensor of a built model, all and trainable ones (LoRA: the
    adapter's)."""

    sizes: tuple[int, ...]
    trainable: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def count_elements(source: dict, base_dir: Path, lora: dict | None = None) -> Counts:
    """Builds the model on the meta device with the runtime's builders (an hf directory from its
    config.json, never its weights) and counts its parameters."""
    import torch

    from dsgraph.runtime import sources

    # A factory is imported from the .dsg file's directory, as at run time.
    sys.path.insert(0, str(Path(base_dir).resolve()))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)      # library deprecations are not the user's
            model = sources.build(source, sources.model_table(), base_dir, weights=False)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"the source returned {type(model).__name__}, not a torch.nn.Module")
            if lora:
                from dsgraph.runtime import adapters

                model = adapters.apply_lora(model, lora, 0, sources.model_task(source, model))
            else:
                model.requires_grad_(True)
    finally:
        sys.path.pop(0)
    params = list(model.parameters())
    return Counts(tuple(p.numel() for p in params), tuple(p.numel() for p in params if p.requires_grad))


# -- the rules ----------------------------------------------------------------------------------

@dataclass
class ModelEstimate:
    name: str
    role: str
    stage: int
    precision: str
    offload: str                    # none, optimizer, param, optimizer+param
    optimizer: str | None
    elements: int
    trainable: int
    params: int                     # bytes on each rank's device
    grads: int
    optimizer_states: int
    host: dict[str, int] = field(default_factory=dict)     # offloaded bytes per category, host RAM
    zero_auto: str | None = None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer_states

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def to_json(self) -> dict:
        return {**asdict(self), "total": self.total, "host_total": self.host_total}


def _states(optimizer: dict | None) -> int:
    if not optimizer:
        return 0
    kind = str(optimizer.get("type", "")).lower()
    if kind == "sgd":
        return 1 if float(optimizer.get("params", {}).get("momentum", 0) or 0) else 0
    return _STATES.get(kind, 2)          # an unknown optimizer: counted like Adam


def _offload(zero: dict) -> tuple[bool, bool]:
    dev = lambda key: str((zero.get(key) or {}).get("device", "none")) if isinstance(zero.get(key), dict) \
        else "none"  # noqa: E731
    return dev("offload_optimizer") != "none", dev("offload_param") != "none"


def estimate_model(name: str, role: str, stage: int, precision: str, config: dict, counts: Counts,
                   world: int) -> ModelEstimate:
    """Bytes per rank of one model (every rank holds the same: DeepSpeed pads the partitions)."""
    zero = config.get("zero_optimization", {})
    off_opt, off_param = _offload(zero)
    trained = role == "trained"
    pb = _PRECISION_BYTES[precision]
    mixed = pb != FP32
    part = lambda n: math.ceil(n / world)  # noqa: E731
    host = {"params": 0, "grads": 0, "optimizer_states": 0}
    if stage == 3:
        # Every tensor is split (DeepSpeed pads each to a multiple of the world size). Measured:
        # stage3_param_persistence_threshold kept no tensor whole in these runs; not modelled.
        params = sum(part(n) for n in counts.sizes) * pb
        local_trained = sum(part(n) for n in counts.trainable)
    else:
        params = counts.total * pb
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
    if off_opt and stage >= 1 and trained:
        host["optimizer_states"], opt = opt, 0
        host["grads"] = local_trained * FP32        # the fp32 gradient partition the CPU optimizer reads
        grads = 0 if stage >= 2 else grads
    offload = "+".join(k for k, on in (("optimizer", off_opt), ("param", off_param)) if on) or "none"
    kind = optimizer.get("type") if optimizer and trained else None
    return ModelEstimate(name, role, stage, precision, offload, kind, counts.total, sum(counts.trainable)
                         if trained else 0, params, grads, opt, {k: v for k, v in host.items() if v})


# -- the estimate of a plan ---------------------------------------------------------------------

@dataclass
class Estimate:
    pipeline: str
    world_size: int
    models: list[ModelEstimate]
    device_memory: int | None = None
    device_source: str | None = None

    @property
    def total(self) -> int:
        return sum(m.total for m in self.models)

    @property
    def host_total(self) -> int:
        return sum(m.host_total for m in self.models)

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline, "world_size": self.world_size, "per_rank": True,
                "models": [m.to_json() for m in self.models], "total": self.total, "host_total": self.host_total,
                "device_memory": self.device_memory, "device_source": self.device_source, "fits": self.fits}

    def to_text(self) -> str:
        rows = [["model", "role", "zero", "precision", "offload", "params", "grads", "optim states",
                 "total/rank"]]
        for m in self.models:
            rows.append([m.name, m.role, f"stage {m.stage}", m.precision, m.offload, human(m.params),
                         human(m.grads), human(m.optimizer_states), human(m.total)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = set(range(5, 9))
        lines = [f"memory estimate of {self.pipeline}, per rank, world size {self.world_size}"]
        lines += ["  " + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
        lines.append(f"  total per device: {human(self.total)} ({self.total} bytes)")
        if self.host_total:
            lines.append(f"  offloaded to host RAM, per rank: {human(self.host_total)}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  device memory: {human(self.device_memory)} ({self.device_source}): {verdict}")
        for m in self.models:
            if m.zero_auto:
                lines.append(f"  {m.name}: {m.zero_auto}")
        lines.append("  counted: parameters, gradients and optimizer states as a step begins; not counted: "
                     "activations, communication buckets, temporary copies, the CUDA context")
        return "\n".join(lines) + "\n"


def estimate(plan: dict, world_size: int | None = None, base_dir: Path | None = None,
             counts: dict[str, Counts] | None = None) -> Estimate:
    """The estimate of every model of a plan (its JSON form), per rank of `world_size` (default:
    the plan's, else 1). `counts` spares building models already counted."""
    world = world_size or plan.get("world_size") or 1
    base = base_dir if base_dir is not None else Path(plan["file"]).parent
    models = []
    for m in plan["models"]:
        c = (counts or {}).get(m["name"]) or count_elements(m["source"], base, m.get("lora"))
        est = estimate_model(m["name"], m["role"], m["stage"], m["precision"], m["deepspeed_config"], c, world)
        est.zero_auto = m.get("zero_auto")
        models.append(est)
    return Estimate(plan["pipeline"], world, models)


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


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import psutil          # not on POSIX

        return psutil.virtual_memory().total


def budget(device_memory: int | None, world: int) -> Budget:
    """--device-memory if given, else the free memory of CUDA device 0, else this machine's RAM
    shared by the ranks. Host RAM is divided by the world size (a conservative bound for ranks on
    one machine)."""
    host = host_memory() // max(world, 1)
    if device_memory is not None:
        return Budget(device_memory, host, False, "--device-memory")
    import torch

    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return Budget(free, host, False, f"free memory of {torch.cuda.get_device_name(0)}")
    ranks = f"{world} processes" if world > 1 else "1 process"
    return Budget(host, host, True, f"no GPU: host RAM {human(host_memory())} shared by {ranks}")


def attach_budget(est: Estimate, device_memory: int | None) -> Estimate:
    b = budget(device_memory, est.world_size)
    est.device_memory, est.device_source = b.device, b.source
    return est


# -- zero = auto --------------------------------------------------------------------------------

# (stage, offload_optimizer, offload_param), least sharded first.
CANDIDATES = ((0, False, False), (1, False, False), (2, False, False), (3, False, False), (3, True, False),
              (3, True, True))


def candidate_config(stage: int, off_opt: bool, off_param: bool) -> dict[str, Any]:
    """The `zero_optimization` of a candidate, as the inline block `{ stage = N ... }` gives it."""
    zero: dict[str, Any] = {"stage": stage}
    if off_opt:
        zero["offload_optimizer"] = {"device": "cpu"}
    if off_param:
        zero["offload_param"] = {"device": "cpu"}
    return zero


def candidates(trained: bool, shared_loss: bool) -> list[tuple[int, bool, bool]]:
    """Stages 1-2 shard nothing of a frozen model; a shared loss needs ZeRO >= 1 (DSG403)."""
    out = [c for c in CANDIDATES if trained or c[0] in (0, 3)]
    out = [c for c in out if trained or not c[1]]
    return [c for c in out if not (shared_loss and c[0] == 0)]
