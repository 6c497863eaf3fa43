"""LoRA adapters (PEFT): wrapping a built model so that only the adapter is trained, and the
export of the adapter and, on request, of the merged weights."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from dsgraph.plan import Lora
from dsgraph.runtime import sources

_PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def apply_lora(model: torch.nn.Module, lora: Lora, seed: int, task: str | None) -> torch.nn.Module:
    """The model wrapped in a PeftModel whose base weights are frozen. Under ZeRO-3 the base is
    already partitioned; the adapter's new parameters are partitioned by deepspeed.initialize.
    The adapter is initialised from `seed` alone, so every rank (and a replica) draws the same."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.targets) if lora.targets is not None else None,
        task_type=_PEFT_TASKS.get(task) if task else None,
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # PEFT sets fan_in_fan_out for GPT-2's Conv1D itself, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            return get_peft_model(model, config)
    except ValueError as error:  # e.g. no module matches `targets`
        raise sources.SourceError(f"lora: {error}") from error


def merged_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in: W + scaling * B @ A (transposed
    for fan-in-fan-out layers such as GPT-2's Conv1D), from a full (gathered) PeftModel state dict."""
    from peft.tuners.lora import LoraLayer

    merged = dict(state)
    for prefix, layer in module.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.lora_A:
            a = merged.pop(f"{prefix}.lora_A.{adapter}.weight").float()
            b = merged.pop(f"{prefix}.lora_B.{adapter}.weight").float()
            delta = (b @ a) * layer.scaling[adapter]
            key = f"{prefix}.base_layer.weight"
            weight = merged.pop(key)
            delta = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
            merged[f"{prefix}.weight"] = (weight.float() + delta).to(weight.dtype)
            if f"{prefix}.base_layer.bias" in merged:
                merged[f"{prefix}.bias"] = merged.pop(f"{prefix}.base_layer.bias")
    base_prefix = "base_model.model."
    return {k[len(base_prefix) :] if k.startswith(base_prefix) else k: v for k, v in merged.items()}


def export_lora(module: torch.nn.Module, state: dict[str, torch.Tensor], lora: Lora, target: Path) -> None:
    """`target/adapter/`: PEFT's adapter files (load with PeftModel.from_pretrained(base, dir)).
    `target/merged/`: the base model with the adapter merged, when lora(merge=true)."""
    module.save_pretrained(str(target / "adapter"), state_dict=state, safe_serialization=True)
    if lora.merge:
        merged = merged_state_dict(module, state)
        base = module.get_base_model()
        if hasattr(base, "save_pretrained"):
            base.save_pretrained(str(target / "merged"), state_dict=merged, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            (target / "merged").mkdir(parents=True, exist_ok=True)
            save_file(merged, str(target / "merged" / "model.safetensors"))
