"""Checkpoints that become visible atomically, and exact resume (inside the workers).

Every engine first writes into `ckpt/<model>/step-N.partial`; once every rank is done, rank 0
renames the folders, every rank digests its share of their files, and rank 0 writes the manifest
(dsgraph.runtime.manifest) last, with fsync. A crash at any point leaves either no manifest for N
(the previous checkpoint stays the newest complete one) or a complete checkpoint. A folder is only
ever loaded (DeepSpeed's loader unpickles) when a valid manifest names it, and the worker checks
the manifest again before loading."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsgraph.runtime import rundir
from dsgraph.runtime.manifest import (
    GENERATOR_PREFIX,
    CheckpointInvalid,
    Manifest,
    RankState,
    SavedModel,
    folder_of,
    read,
    saved_files,
    tag,
)

if TYPE_CHECKING:
    from dsgraph.runtime.executor import Executor


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


def generator_states(generators: dict[str, Any]) -> dict[str, str]:
    return {GENERATOR_PREFIX + name: _b64(g.get_state().numpy().tobytes()) for name, g in generators.items()}


def set_generator_states(state: dict[str, str], make: Any) -> None:
    """Each saved generation's generator (`make(name)` creates it) back at its saved state."""
    import torch

    for key, value in state.items():
        if key.startswith(GENERATOR_PREFIX):
            raw = torch.frombuffer(bytearray(base64.b64decode(value)), dtype=torch.uint8)
            make(key.removeprefix(GENERATOR_PREFIX)).set_state(raw)


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
    run_dir, name, backend = executor.run_dir, tag(step), executor.backend
    trained = [m.name for m in executor.plan.models if m.trained]
    if executor.rank == 0:  # what an earlier run left of this step goes first, its manifest before its files
        (run_dir / "ckpt" / "manifests" / f"{name}.json").unlink(missing_ok=True)
        for model in trained:
            _remove(run_dir / "ckpt" / model / (name + ".partial"))
            _remove(run_dir / folder_of(model, step))
    backend.barrier()
    for model in trained:
        # DeepSpeed writes this rank's shards; `.partial` until every rank is done.
        backend.save_checkpoint(model, str(run_dir / "ckpt" / model), name + ".partial")
    rng = {**rng_state(), **generator_states(executor.generators)}
    mine = RankState(rng, {d: b.sampler.state() for d, b in executor.batches.items()})
    ranks = backend.all_gather_object(mine, executor.world)
    backend.barrier()
    if executor.rank == 0:
        for model in trained:
            (run_dir / "ckpt" / model / (name + ".partial")).rename(run_dir / folder_of(model, step))
    backend.barrier()
    # Each rank digests every world-th file: the cost of reading a large checkpoint is shared.
    share = {}
    for model in trained:
        folder = run_dir / folder_of(model, step)
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        share[model] = saved_files(folder, names[executor.rank :: executor.world])
    shares = backend.all_gather_object(share, executor.world)
    if executor.rank == 0:
        models = tuple(
            SavedModel(m, folder_of(m, step), tuple(sorted((f for s in shares for f in s[m]), key=lambda f: f.path)))
            for m in trained
        )
        manifest = Manifest(step, executor.world, executor.identity, models, tuple(ranks))
        folder = run_dir / "ckpt" / "manifests"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.json.tmp"
        with rundir.open_new(tmp) as f:
            f.write(manifest.to_json().encode())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(folder / f"{name}.json")  # the checkpoint exists from this moment
    backend.barrier()


def _remove(path: Path) -> None:
    """A file, a link (never what it points to) or a folder."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def load(executor: Executor, path: Path) -> Manifest:
    """Restores the checkpoint whose manifest is at `path`, which the driver validated; it is
    checked again here (layout and sizes) before any file of it is unpickled."""
    try:
        manifest = read(path, executor.run_dir, digests=False)
    except CheckpointInvalid as error:
        raise RuntimeError(f"checkpoint {path}: {error}") from None
    if manifest.world_size != executor.world:
        raise RuntimeError(f"checkpoint {path} was saved by {manifest.world_size} processes, not {executor.world}")
    for model in manifest.models:
        folder = executor.run_dir / model.folder
        executor.backend.load_checkpoint(model.name, str(folder.parent), folder.name)
    mine = manifest.ranks[executor.rank]
    for data_name, state in mine.data.items():
        executor.batches[data_name].sampler.restore(state)
    executor.resume_rng = mine.rng
    return manifest
