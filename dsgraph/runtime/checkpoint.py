"""Checkpoints that become visible atomically, and exact resume.

Layout, per step N (`step-0000000N`):
    ckpt/<model>/step-N/             each trained model's DeepSpeed checkpoint, its own folder
    ckpt/manifests/step-N.json      the dsgraph manifest (JSON, never pickle), written last

Every engine first writes into `step-N.partial`; after all ranks are done, rank 0 renames the
folders and then writes the manifest. A crash at any point leaves either no manifest for N (the
previous checkpoint stays the newest complete one) or a complete checkpoint. A folder is only
ever loaded (DeepSpeed's loader unpickles) when a valid manifest names it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsgraph.plan import Model, Plan, Source

if TYPE_CHECKING:
    from dsgraph.runtime.executor import Executor

MANIFEST_VERSION = 1


def tag(step: int) -> str:
    return f"step-{step:08d}"


# -- what must not change between a checkpoint and its resume --------------------------------------


def identity(plan: Plan) -> dict[str, Any]:
    """The parts of a plan a resumed run must share with the run that saved: models (source, role,
    DeepSpeed config), losses, data, seed and batch geometry. Steps, logging and checkpoint
    intervals may change."""

    def config(m: Model) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(json.dumps(m.deepspeed_config))
        cfg.get("scheduler", {}).get("params", {}).pop("total_num_steps", None)
        cfg.pop("train_batch_size", None)  # follows the world size, which is compared on its own
        return cfg

    s = plan.settings
    return {
        "models": {
            m.name: {"source": source_json(m.source), "role": m.role.value, "deepspeed_config": config(m)}
            for m in plan.models
        },
        "losses": {loss.name: loss.text for loss in plan.losses},
        "data": {d.name: source_json(d.source) for d in plan.data},
        "seed": s.seed,
        "micro_batch": s.micro_batch,
        "grad_accum": s.grad_accum,
    }


def source_json(source: Source) -> dict[str, Any]:
    """A source as JSON, without its span."""
    return {"kind": source.kind.value, "target": source.target, "args": [[k, v] for k, v in source.args]}


def digest(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str | None]]:
    """What differs, in words, with the model/loss it concerns (to point at its declaration)."""
    out: list[tuple[str, str | None]] = []
    for key in ("seed", "micro_batch", "grad_accum"):
        if saved[key] != current[key]:
            out.append((f"{key} was {saved[key]}, is now {current[key]}", None))
    for section, noun in (("models", "model"), ("losses", "loss"), ("data", "data set")):
        for name in sorted(set(saved[section]) | set(current[section])):
            before, now = saved[section].get(name), current[section].get(name)
            if before == now:
                continue
            if before is None:
                out.append((f"{noun} `{name}` is new", name))
            elif now is None:
                out.append((f"{noun} `{name}` is gone", None))
            elif section == "models":
                changed = [k for k in now if before.get(k) != now[k]]
                if "deepspeed_config" in changed:
                    keys = _changed_keys(before["deepspeed_config"], now["deepspeed_config"])
                    changed[changed.index("deepspeed_config")] = f"deepspeed_config ({', '.join(keys)})"
                out.append((f"{noun} `{name}` changed: {', '.join(changed)}", name))
            else:
                out.append((f"{noun} `{name}` changed: `{before}` -> `{now}`", name))
    return out


def _changed_keys(before: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(before) | set(now)):
            out += _changed_keys(before.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if before == now else [prefix or "(whole)"]


# -- finding the newest complete checkpoint (no torch needed) --------------------------------


def latest(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest manifest whose model folders all exist, or None."""
    folder = run_dir / "ckpt" / "manifests"
    for path in sorted(folder.glob("step-*.json"), reverse=True) if folder.is_dir() else []:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("dsgraph_checkpoint") != MANIFEST_VERSION:
            continue
        if all((run_dir / rel).is_dir() for rel in manifest.get("models", {}).values()):
            return manifest, path
    return None


def incomplete(run_dir: Path) -> list[Path]:
    ckpt = run_dir / "ckpt"
    return sorted(ckpt.glob("*/*.partial")) if ckpt.is_dir() else []


# -- saving and loading (inside workers) -----------------------------------------------------


def rng_state() -> dict[str, str]:
    import numpy
    import torch

    state = {
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "python": json.dumps(_jsonable(random.getstate())),
        "numpy": json.dumps(_jsonable(numpy.random.get_state())),
    }
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def set_rng_state(state: dict[str, str]) -> None:
    import numpy
    import torch

    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json.loads(state["numpy"])
    numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def save(executor: Executor, step: int) -> None:
    """Collective: every rank calls it at the same step."""
    run_dir, name = executor.run_dir, tag(step)
    trained = [m.name for m in executor.plan.models if m.trained]
    for model in trained:
        # DeepSpeed writes this rank's shards; `.partial` until every rank is done.
        executor.backend.save_checkpoint(model, str(run_dir / "ckpt" / model), name + ".partial")
    mine = {"rng": rng_state(), "data": {d: b.sampler.state() for d, b in executor.batches.items()}}
    ranks = executor.backend.all_gather_object(mine, executor.world)
    executor.backend.barrier()
    if executor.rank == 0:
        for model in trained:
            final = run_dir / "ckpt" / model / name
            if final.exists():
                shutil.rmtree(final)
            (run_dir / "ckpt" / model / (name + ".partial")).rename(final)
        manifest = {
            "dsgraph_checkpoint": MANIFEST_VERSION,
            "step": step,
            "world_size": executor.world,
            "plan_digest": digest(identity(executor.plan)),
            "identity": identity(executor.plan),
            "seed": executor.settings.seed,
            "models": {m: str(Path("ckpt") / m / name) for m in trained},
            "frozen": {m.name: source_json(m.source) for m in executor.plan.models if not m.trained},
            "ranks": ranks,
        }
        folder = run_dir / "ckpt" / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.json.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / f"{name}.json")  # the checkpoint exists from this moment
    executor.backend.barrier()


def load(executor: Executor, manifest: dict[str, Any]) -> None:
    for model, rel in manifest["models"].items():
        path = executor.run_dir / rel
        executor.backend.load_checkpoint(model, str(path.parent), path.name)
    mine = manifest["ranks"][executor.rank]
    for data_name, state in mine["data"].items():
        executor.batches[data_name].sampler.restore(state)
    executor.resume_rng = mine["rng"]
