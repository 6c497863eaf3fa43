"""LoRA adapters (PEFT): wrapping a built model so that only the adapter is trained, and the
export of the adapter and, on request, of the merged weights. 4-bit weights (bitsandbytes, as
QLoRA loads them): the quantization config a model is loaded with, and what a 4-bit model needs
before its engine takes it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from dsgraph.plan import Lora, Precision, Quantize
from dsgraph.runtime import sources

DTYPES = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}

# Imported on a CPU (by PEFT too, for any LoRA model), bitsandbytes says that its optional
# `kernels` package (kernels fetched from the Hugging Face Hub) is missing, and uses its own CPU
# kernels: nothing for a dsgraph user to do, and dsgraph downloads nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def quantization_config(quantize: Quantize, precision: Precision) -> Any:
    """Transformers' BitsAndBytesConfig for `quantize`: the weights packed in the model's own
    dtype (bnb_4bit_quant_storage), which DeepSpeed then leaves as they are (an engine of another
    dtype would cast the packed bytes by value), and computed in it. ZeRO-3 partitions the packed
    weights like any parameter of that dtype."""
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[precision]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize.type,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=quantize.double_quant,
        bnb_4bit_quant_storage=dtype,
    )


def prepare_4bit_training(model: torch.nn.Module, gradient_checkpointing: bool) -> torch.nn.Module:
    """PEFT's preparation of a 4-bit model for training an adapter on it: every base weight
    frozen, the unquantized ones (norms, embeddings, the head) in fp32, and gradient checkpointing
    if the model asks for it (non-reentrant, as dsgraph enables it elsewhere)."""
    from peft import prepare_model_for_kbit_training

    with warnings.catch_warnings():  # Transformers 5 renamed gradient_checkpointing_enable, and says so
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Turns off bitsandbytes' CPU repacking in every 4-bit layer; returns how many there are.
    On a CPU with AVX512-BF16, a Linear4bit's first forward in eval mode without gradients
    rewrites its weight into another layout and marks its quant state so; ZeRO-3 then gathers
    the weight from its partitions in the old layout, and the layer computes with the wrong
    weights (no error: wrong logits). Needed for trained and frozen models alike, before any
    forward (evaluation runs every model in eval mode). On an accelerator the flag is not read."""
    from bitsandbytes.nn.modules import Linear4bit

    layers = [module for module in model.modules() if isinstance(module, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


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
