"""Exporting trained models: full weights gathered from the ZeRO shards, as safetensors, or with
`save_pretrained` for Hugging Face models; a LoRA model's adapter (and merged weights on request).
Rank 0 writes; every rank takes part in the gather."""

from __future__ import annotations

import json
from pathlib import Path

from dsgraph.plan import Model, SourceKind
from dsgraph.runtime.adapters import export_lora
from dsgraph.runtime.manifest import source_json
from dsgraph.runtime.rundir import write_new
from dsgraph.runtime.engines import Backend


def export_model(backend: Backend, model: Model, out_dir: Path) -> Path | None:
    state = backend.full_state_dict(model.name)  # collective: every rank must call it
    if state is None:
        return None
    target = out_dir / model.name
    target.mkdir(parents=True, exist_ok=True)
    module = backend.module(model.name)
    if model.lora:
        export_lora(module, state, model.lora, target)
    elif model.source.kind is SourceKind.HF and hasattr(module, "save_pretrained"):
        module.save_pretrained(str(target), state_dict=state, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file(state, str(target / "model.safetensors"), metadata={"dsgraph_model": model.name})
        write_new(target / "source.json", json.dumps(source_json(model.source), indent=2) + "\n")
    return target
