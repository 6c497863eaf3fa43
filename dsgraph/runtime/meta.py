"""What the memory estimate and `zero = auto` need from torch: each model's element counts, from
building it on the meta device with the runtime's own builders (an hf directory from its
config.json, never its weights: nothing is allocated or read but the config), and how much memory
a device has."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from dsgraph.dsconfig.estimate import Budget, Counts, quant_state_bytes
from dsgraph.dsconfig.sizes import human
from dsgraph.plan import Lora, Plan, Quantize, Source
from dsgraph.runtime import adapters, sources


def count_elements(
    source: Source, base_dir: Path, lora: Lora | None = None, quantize: Quantize | None = None
) -> Counts:
    # A factory is imported from the .dsg file's directory, as at run time.
    sys.path.insert(0, str(Path(base_dir).resolve()))
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # library deprecations are not the user's
            model = sources.build(source, sources.model_table(), base_dir, weights=False)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"the source returned {type(model).__name__}, not a torch.nn.Module")
            four_bit = quantized_weights(model) if quantize else set()
            if lora:
                model = adapters.apply_lora(model, lora, 0, sources.model_task(source, model))
            else:
                model.requires_grad_(True)
    finally:
        sys.path.pop(0)
    params = list(model.parameters())
    quantized = tuple(p.numel() for p in params if id(p) in four_bit)
    return Counts(
        tuple(p.numel() for p in params),
        tuple(p.numel() for p in params if p.requires_grad and id(p) not in four_bit),
        quantized,
        sum(quant_state_bytes(n, quantize.double_quant) for n in quantized) if quantize else 0,
    )


def quantized_weights(model: torch.nn.Module) -> set[int]:
    """The ids of the weights that Transformers' bitsandbytes integration loads in 4 bits, by its
    own rule (integrations/bitsandbytes.py `replace_with_bnb_linear`): every `nn.Linear` and GPT-2
    `Conv1D` except the modules it keeps: the output embeddings (`lm_head`), weights tied to
    others, the module of the last parameter, and `_keep_in_fp32_modules`."""
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return {
        id(module.weight)
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keep)
    }


def count_plan(plan: Plan, base_dir: Path | None = None) -> dict[str, Counts]:
    """The counts of every model of a plan; files are relative to the .dsg file (or `base_dir`)."""
    base = base_dir if base_dir is not None else Path(plan.file).parent
    return {m.name: count_elements(m.source, base, m.lora, m.quantize) for m in plan.models}


def host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import psutil  # not on POSIX

        return psutil.virtual_memory().total


def budget(device_memory: int | None, world: int) -> Budget:
    """--device-memory if given, else the free memory of CUDA device 0, else this machine's RAM
    shared by the ranks. Host RAM is divided by the world size (a conservative bound for ranks on
    one machine)."""
    host = host_memory() // max(world, 1)
    if device_memory is not None:
        return Budget(device_memory, host, False, "--device-memory")
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return Budget(free, host, False, f"free memory of {torch.cuda.get_device_name(0)}")
    ranks = f"{world} processes" if world > 1 else "1 process"
    return Budget(host, host, True, f"no GPU: host RAM {human(host_memory())} shared by {ranks}")
