"""The last step of config resolution, at run time: what the plan left "auto" (batch size for
this world size, bucket sizes from the model, total steps), plus the CPU-only settings."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim")
DEFAULT_HIDDEN = 1024


def hidden_size_of_source(source: dict, base_dir: Path) -> int | None:
    """The model's width, known before it is built (ZeRO-3 models are partitioned as they are
    built, so their config must be complete first)."""
    args = {k: v for k, v in source["args"]}
    if source["kind"] == "builtin":
        if source["target"] == "mlp":
            return max([args["inputs"], args["outputs"], *args.get("hidden", [])])
        if source["target"] == "causal_lm":
            return args.get("dim", 64)
    if source["kind"] == "hf":
        config = args.get("config")
        if isinstance(config, dict):
            return next((config[k] for k in _HIDDEN_KEYS if k in config), None)
        path = base_dir / (config if isinstance(config, str) else str(args.get("0", "")))
        path = path if path.suffix == ".json" else path / "config.json"
        if path.is_file():
            data = json.loads(path.read_text())
            return next((data[k] for k in _HIDDEN_KEYS if k in data), None)
    return None


def hidden_size_of_model(model) -> int:
    width = getattr(model, "hidden_size", None) or getattr(getattr(model, "config", None), "hidden_size", None)
    if width:
        return int(width)
    shapes = [max(p.ds_shape if hasattr(p, "ds_shape") else p.shape, default=1) for p in model.parameters()]
    return int(max(shapes, default=DEFAULT_HIDDEN))


def finalize(plan_model: dict, world: int, total_steps: int, hidden: int | None, on_cpu: bool) -> dict[str, Any]:
    """The config handed to DeepSpeed: integers only, nothing "auto" left."""
    cfg = copy.deepcopy(plan_model["deepspeed_config"])
    hidden = hidden or DEFAULT_HIDDEN
    fills = {
        "train_batch_size": cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world,
        "zero_optimization.reduce_bucket_size": hidden * hidden,
        "zero_optimization.allgather_bucket_size": hidden * hidden,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
        "zero_optimization.stage3_max_live_parameters": int(1e9),
        "zero_optimization.stage3_max_reuse_distance": int(1e9),
        "scheduler.params.total_num_steps": total_steps,
    }
    for path in plan_model["runtime_auto"]:
        node = cfg
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = fills[path]
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if optimizer["type"] in ("Adam", "AdamW"):
            if on_cpu:  # DeepSpeed's FusedAdam needs a ~45 s op build on CPU; torch's AdamW is the same math
                optimizer.setdefault("params", {}).setdefault("torch_adam", True)
        else:       # DeepSpeed builds other types from torch.optim; ZeRO only vouches for Adam(W)
            cfg["zero_allow_untested_optimizer"] = True
    cfg.setdefault("steps_per_print", 10**9)
    return cfg
