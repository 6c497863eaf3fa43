"""Exporting trained models: full weights gathered from the ZeRO shards, as safetensors, or with
`save_pretrained` for Hugging Face models; a LoRA model's adapter (and merged weights on request).
Rank 0 writes; every rank takes part in the gather."""
from __future__ import annotations

import json
from pathlib import Path

from dsgraph.runtime.adapters import export_lora
from dsgraph.runtime.engines import Backend


def export_model(backend: Backend, plan_model: dict, out_dir: Path) -> Path | None:
    name = plan_model["name"]
    state = backend.full_state_dict(name)       # collective: every rank must call it
    if state is None:
        return None
    target = out_dir / name
    target.mkdir(parents=True, exist_ok=True)
    module = backend.models[name].engine.module
    if plan_model.get("lora"):
        export_lora(module, state, plan_model["lora"], target)
    elif plan_model["source"]["kind"] == "hf" and hasattr(module, "save_pretrained"):
        module.save_pretrained(str(target), state_dict=state, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(state, str(target / "model.safetensors"), metadata={"dsgraph_model": name})
        (target / "source.json").write_text(json.dumps(plan_model["source"], indent=2) + "\n")
    return target
