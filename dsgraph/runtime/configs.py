"""The last step of config resolution, at run time, in one function: `complete` fills what the plan
marked as known only to the run (`Model.fills`: the batch size for this world size, bucket sizes
from the model's width, total steps of an epoch-based run) and the settings of the device. The
compiler resolved everything else; nothing but this function changes a config afterwards."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from dsgraph.plan import Fill, Model, Source, SourceKind, Width

DEFAULT_WIDTH = 1024
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim")


def complete(model: Model, world: int, total_steps: int, width: int | None, on_cpu: bool) -> dict[str, Any]:
    """The config handed to DeepSpeed: nothing "auto" left. `width` is needed (not None) exactly
    when one of the model's fills follows it."""
    cfg = copy.deepcopy(model.deepspeed_config)
    for fill in model.fills:
        *parents, leaf = fill.value.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = _value(fill, cfg, world, total_steps, width)
    optimizer = cfg.get("optimizer")
    if on_cpu and optimizer is not None and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        # DeepSpeed's FusedAdam needs a ~45 s op build on CPU; torch's AdamW is the same math.
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def _value(fill: Fill, cfg: dict[str, Any], world: int, total_steps: int, width: int | None) -> int:
    if fill is Fill.TRAIN_BATCH_SIZE:
        return int(cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world)
    if fill is Fill.TOTAL_NUM_STEPS:
        return total_steps
    if fill in (Fill.MAX_LIVE_PARAMETERS, Fill.MAX_REUSE_DISTANCE):
        return int(1e9)
    assert width is not None, f"{fill.value} follows the model's width"
    if fill in (Fill.REDUCE_BUCKET_SIZE, Fill.ALLGATHER_BUCKET_SIZE):
        return width * width
    if fill is Fill.PREFETCH_BUCKET_SIZE:
        return int(0.9 * width * width)
    assert fill is Fill.PARAM_PERSISTENCE_THRESHOLD, fill
    return 10 * width


def width(model: Model, base_dir: Path, built: nn.Module | None) -> int | None:
    """The width the model's bucket sizes follow, from where the plan says (None: none needs it)."""
    match model.width:
        case None:
            return None
        case Width.SOURCE:
            return width_of_source(model.source, base_dir) or DEFAULT_WIDTH
        case Width.MODEL:
            assert built is not None, f"`{model.name}` is measured once built"
            return width_of_model(built)
        case Width.DEFAULT:
            return DEFAULT_WIDTH


def width_of_source(source: Source, base_dir: Path) -> int | None:
    """A built-in's width from its arguments, a Hugging Face model's from its config."""
    if source.kind is SourceKind.BUILTIN:
        if source.target == "mlp":
            return max([source.arg("inputs"), source.arg("outputs"), *source.arg("hidden", [])])
        if source.target == "causal_lm":
            return int(source.arg("dim", 64))
    if source.kind is SourceKind.HF:
        config = source.arg("config")
        if isinstance(config, dict):
            return next((int(config[k]) for k in _WIDTH_KEYS if k in config), None)
        path = base_dir / (config if isinstance(config, str) else str(source.arg("0", "")))
        path = path if path.suffix == ".json" else path / "config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return next((int(data[k]) for k in _WIDTH_KEYS if k in data), None)
    return None


def width_of_model(model: nn.Module) -> int:
    found = getattr(model, "hidden_size", None) or getattr(getattr(model, "config", None), "hidden_size", None)
    if found:
        return int(found)
    shapes = [max(p.ds_shape if hasattr(p, "ds_shape") else p.shape, default=1) for p in model.parameters()]
    return int(max(shapes, default=DEFAULT_WIDTH))
