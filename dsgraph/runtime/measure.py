"""What one rank holds for each model, measured: the bytes of the local tensors of parameters,
gradients and optimizer states, the three categories `dsgraph compile --memory` estimates.

Each tensor is counted once, by its storage (ZeRO's flat buffers and the views into them are one
allocation), in the order parameters, gradients, optimizer states: a buffer that is both the
parameter partition and the fp32 master copy (ZeRO-3 in fp32) counts as parameters only. The
quantization constants of 4-bit weights (bitsandbytes' QuantState: not parameters, whole on every
rank) count as parameters.
Activations, communication buckets (`ipg` buffers), temporary copies and allocator caches are not
counted; nor are tensors on the meta device.

When: the backend measures a trained model once, as its second optimizer step begins
(`Backend.watch_memory`), when the gradients of the step are reduced and the optimizer states
exist (a run of one step is measured at its end, after the step has freed its gradients); a
frozen model at the report. Only the backend calls `measure`: it reads DeepSpeed's internals."""

from __future__ import annotations

from typing import Any
from collections.abc import Iterable

import torch

CATEGORIES = ("params", "grads", "optimizer_states")

# The ZeRO optimizers' own buffers (DeepSpeed 0.19: stage_1_and_2.py, stage3.py, bf16_optimizer.py).
_GRAD_BUFFERS = (
    "grads_in_partition",
    "grad_partitions_flat_buffer",
    "averaged_gradients",
    "fp32_groups_gradients_flat",
)
_MASTER_WEIGHTS = (
    "single_partition_of_fp32_groups",
    "fp32_partitioned_groups_flat",
    "fp32_groups_flat_partition",
    "fp32_groups_flat",
)


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    """Every tensor in a tensor, list, tuple or dict (nested)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _quant_states(params: list[torch.Tensor]) -> Iterable[torch.Tensor]:
    """The tensors of each 4-bit weight's quantization state, and of its nested state (the
    quantized scales' own constants, with double quant)."""
    for p in params:
        state = getattr(p, "quant_state", None)
        while state is not None:
            yield from (v for v in vars(state).values() if isinstance(v, torch.Tensor))
            state = getattr(state, "state2", None)


class _Counter:
    """Bytes by category, each byte of a storage counted once: a view counts its own bytes, not
    the rest of the buffer it lies in (ZeRO slices partitions out of larger flat buffers)."""

    def __init__(self) -> None:
        self.spans: dict[tuple[str, int], list[tuple[int, int]]] = {}  # storage -> byte ranges taken
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.host = 0  # of the above, bytes on the CPU while the model is not

    def add(self, category: str, tensors: Iterable[torch.Tensor], device_type: str) -> None:
        for t in tensors:
            if t is None or t.device.type == "meta" or t.numel() == 0:
                continue
            size = t.element_size()
            start = t.storage_offset() * size
            extent = (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1) * size
            taken = self.spans.setdefault((str(t.device), t.untyped_storage().data_ptr()), [])
            new = _uncovered(start, start + extent, taken)
            if not new:
                continue
            self.bytes[category] += new
            if t.device.type == "cpu" and device_type != "cpu":
                self.host += new


def _uncovered(start: int, end: int, taken: list[tuple[int, int]]) -> int:
    """Bytes of [start, end) not yet in `taken`; adds them."""
    new, cursor = 0, start
    for a, b in sorted(taken):
        if b <= cursor or a >= end:
            continue
        new += max(0, a - cursor)
        cursor = max(cursor, b)
    new += max(0, end - cursor)
    if new:
        taken.append((start, end))
    return new


def _zero_optimizer(engine: Any) -> Any:
    """The ZeRO (or BF16/FP16) optimizer wrapper of an engine, or None."""
    optimizer = getattr(engine, "optimizer", None)
    return optimizer if optimizer is not None and hasattr(optimizer, "optimizer") else None


def _inner_optimizer(engine: Any) -> Any:
    optimizer = getattr(engine, "optimizer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def measure(engine: Any, device_type: str | None = None) -> dict[str, int]:
    """Bytes of this rank's local tensors of one engine, by category, and `host` (the part of
    them on the CPU when the model runs on an accelerator: offloaded states)."""
    params = list(engine.module.parameters())
    device_type = device_type or (params[0].device.type if params else "cpu")
    count = _Counter()
    count.add("params", (p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in params), device_type)
    count.add("params", (p.data for p in params if getattr(p, "ds_persist", False)), device_type)
    count.add("params", _quant_states(params), device_type)
    wrapper = _zero_optimizer(engine)
    count.add("grads", (p.grad for p in params if p.grad is not None), device_type)
    inner = _inner_optimizer(engine)
    masters = []
    if wrapper is not None:
        for name in _GRAD_BUFFERS:
            count.add("grads", _tensors(getattr(wrapper, name, None)), device_type)
        for name in _MASTER_WEIGHTS:
            masters += list(_tensors(getattr(wrapper, name, None)))
    if inner is not None:
        group_params = [p for group in inner.param_groups for p in group["params"]]
        count.add("grads", (p.grad for p in group_params if p.grad is not None), device_type)
        masters += [p for p in group_params if p.dtype == torch.float32]
        count.add("optimizer_states", masters, device_type)
        count.add("optimizer_states", _tensors(list(inner.state.values())), device_type)
    out = dict(count.bytes)
    out["total"] = sum(count.bytes.values())
    out["host"] = count.host
    return out


def live_tensor_bytes() -> int:
    """The bytes of every tensor storage this process can still reach (each storage once, meta
    tensors left out): what a released model's memory is measured against. Walks every object
    the garbage collector tracks, so it is called outside the loop."""
    import gc

    seen: dict[tuple[str, int], int] = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
        except RuntimeError:  # a tensor without storage (a functional or sparse wrapper)
            continue
        seen[(str(obj.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())
