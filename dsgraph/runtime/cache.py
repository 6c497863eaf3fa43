"""The cache of hoisted outputs: one folder per `fill_cache` step, named by the digest of all it
depends on, holding each entry's rows by sample index as memory-mapped `.npy` arrays and a
manifest written last.

    CACHE_DIR/<digest>/manifest.json      what was computed, from what; present = complete
    CACHE_DIR/<digest>/entry0.npy         rows of a whole output, [samples, ...]
    CACHE_DIR/<digest>/entry1.values.npy  top-k log-probabilities, [samples, ..., K] float32
    CACHE_DIR/<digest>/entry1.ids.npy     their class ids, [samples, ..., K] int32

A fill is written into `<digest>.partial-<run id>` and renamed when every rank has written its
rows and the manifest is in: a killed precompute leaves a partial folder, never one that looks
complete. The digest covers the fill as the plan states it (the call, its arguments, its
entries), the model (source, precision, adapter, quantization, its seed, the bytes of its files)
and the data set (source, collate, the bytes of its files); not the world size or the batch
geometry, which do not change a sample's output. A folder whose manifest does not match is
computed again. The folder lives in the run directory unless `cache_dir` says where: then runs
that share a teacher and its data share the cache (a sweep over students computes it once)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dsgraph import plan as P
from dsgraph.plan.codec import encode
from dsgraph.runtime import manifest, rundir
from dsgraph.runtime.builtins import TopK, topk_of

FORMAT = 1


def directory(plan: P.Plan, run_dir: Path) -> Path:
    assert plan.precompute is not None
    given = plan.precompute.directory
    return (Path(plan.file).parent / given).resolve() if given else run_dir / "cache"


def fill_digest(plan: P.Plan, step: P.FillCache, model_seed: int, base_dir: Path) -> str:
    """What a fill's rows depend on, hashed."""
    m, d = plan.model(step.model), plan.data_set(step.data)
    assert plan.precompute is not None
    content = {
        "format": FORMAT,
        "fill": encode(step, P.TAGGED, skip=frozenset({"span", "id", "rows", "bytes"})),
        "entries": [encode(plan.precompute.entry(e), P.TAGGED) for e in step.entries],
        "model": {
            "source": manifest.source_json(m.source),
            "files": _model_files(m.source, base_dir),
            "precision": m.precision.value,
            "lora": encode(m.lora, P.TAGGED) if m.lora else None,
            "quantize": encode(m.quantize, P.TAGGED) if m.quantize else None,
            "seed": model_seed,
        },
        "data": {
            "source": manifest.source_json(d.source),
            "content": manifest.data_digest(d.source, base_dir),
            "collate": manifest.source_json(d.collate) if d.collate else None,
        },
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _model_files(source: P.Source, base_dir: Path) -> str | None:
    """The bytes a model is built from: a Hugging Face directory, or a factory's module file."""
    if source.kind is P.SourceKind.HF and isinstance(source.arg("0"), str):
        return manifest.path_digest(base_dir / source.arg("0"))
    if source.kind is P.SourceKind.FACTORY:
        import importlib.util

        spec = importlib.util.find_spec(source.target.partition(":")[0])
        if spec is not None and spec.origin and os.path.isfile(spec.origin):
            return manifest.path_digest(Path(spec.origin))
    return None


@dataclass
class Arrays:
    """An entry's memory-mapped arrays: one for a whole output, values and ids for top-k."""

    whole: np.ndarray | None = None
    values: np.ndarray | None = None
    ids: np.ndarray | None = None
    bf16: bool = False  # stored as int16 (NumPy has no bfloat16)

    def rows(self, index: np.ndarray, device: torch.device) -> Any:
        if self.whole is not None:
            rows = torch.from_numpy(np.ascontiguousarray(self.whole[index]))
            return (rows.view(torch.bfloat16) if self.bf16 else rows).to(device, non_blocking=True)
        assert self.values is not None and self.ids is not None
        return TopK(
            torch.from_numpy(np.ascontiguousarray(self.values[index])).to(device, non_blocking=True),
            torch.from_numpy(np.ascontiguousarray(self.ids[index])).to(device, non_blocking=True).long(),
        )


def _files(index: int, topk: bool) -> tuple[str, ...]:
    return (f"entry{index}.values.npy", f"entry{index}.ids.npy") if topk else (f"entry{index}.npy",)


class Fill:
    """One fill's folder: found complete (reused), or written now."""

    def __init__(self, root: Path, digest: str, step: P.FillCache, entries: list[P.CacheEntry], run_id: str):
        self.step, self.entries, self.digest = step, entries, digest
        self.final = root / digest
        self.partial = root / f"{digest}.partial-{run_id}"
        self.arrays: dict[str, Arrays] = {}

    # -- reading ---------------------------------------------------------------------------

    def complete(self, rows: int) -> bool:
        """The folder exists, its manifest is this fill's, and every array holds `rows` rows."""
        try:
            found = json.loads((self.final / "manifest.json").read_text())
        except (OSError, ValueError):
            return False
        if found.get("digest") != self.digest or found.get("rows") != rows:
            return False
        try:
            self.open(self.final)
        except (OSError, ValueError):
            return False
        return all(a.shape[0] == rows for arrays in self.arrays.values() for a in _present(arrays))

    def open(self, folder: Path, mode: Literal["r", "r+"] = "r") -> None:
        self.arrays = {}
        for index, entry in enumerate(self.entries):
            names = _files(index, entry.topk is not None)
            mapped = [np.load(folder / name, mmap_mode=mode) for name in names]
            if entry.topk is None:
                bf16 = (folder / f"entry{index}.bf16").exists()
                self.arrays[entry.id] = Arrays(whole=mapped[0], bf16=bf16)
            else:
                self.arrays[entry.id] = Arrays(values=mapped[0], ids=mapped[1])

    # -- writing ---------------------------------------------------------------------------

    def create(self, rows: int, first: dict[str, Any]) -> None:
        """Rank 0: the partial folder with every array allocated, shaped after the first batch's
        outputs (`first`: entry -> that batch's value)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        for index, entry in enumerate(self.entries):
            value = first[entry.id]
            if isinstance(value, TopK):
                shape = (rows, *value.logp.shape[1:])
                for name, dtype in zip(_files(index, True), (np.float32, np.int32), strict=True):
                    np.lib.format.open_memmap(self.partial / name, mode="w+", dtype=dtype, shape=shape).flush()
            else:
                dtype = np.int16 if value.dtype == torch.bfloat16 else _numpy_dtype(value.dtype)
                if value.dtype == torch.bfloat16:
                    (self.partial / f"entry{index}.bf16").touch()
                shape = (rows, *value.shape[1:])
                np.lib.format.open_memmap(self.partial / _files(index, False)[0], mode="w+", dtype=dtype, shape=shape)

    def write(self, index: list[int], values: dict[str, Any]) -> None:
        """This rank's rows of one batch (opened for writing on the first call)."""
        if not self.arrays:
            self.open(self.partial, "r+")
        at = np.asarray(index)
        for entry_id, value in values.items():
            arrays = self.arrays[entry_id]
            if isinstance(value, TopK):
                assert arrays.values is not None and arrays.ids is not None
                arrays.values[at] = value.logp.detach().float().cpu().numpy()
                arrays.ids[at] = value.ids.detach().to(torch.int32).cpu().numpy()
            else:
                assert arrays.whole is not None
                tensor = value.detach().cpu()
                if tensor.shape[1:] != arrays.whole.shape[1:]:
                    raise ValueError(
                        f"`{entry_id}` has rows of shape {tuple(tensor.shape[1:])} in this batch and "
                        f"{tuple(arrays.whole.shape[1:])} in the first: a cached output must have one shape per "
                        "sample (pad sequences to a fixed max_length)"
                    )
                arrays.whole[at] = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()

    def flush(self) -> None:
        for arrays in self.arrays.values():
            for array in _present(arrays):
                if isinstance(array, np.memmap):
                    array.flush()
        self.arrays = {}

    def commit(self, rows: int, seconds: float) -> None:
        """Rank 0, once every rank has flushed: the manifest, then the folder renamed into place."""
        record = {
            "digest": self.digest,
            "rows": rows,
            "call": self.step.text,
            "model": self.step.model,
            "data": self.step.data,
            "entries": [e.id for e in self.entries],
            "seconds": round(seconds, 3),
        }
        rundir.write_new(self.partial / "manifest.json", json.dumps(record, indent=2) + "\n")
        if self.final.exists():  # a stale fill of the same digest: computed again, replaced
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)


def _present(arrays: Arrays) -> list[np.ndarray]:
    return [a for a in (arrays.whole, arrays.values, arrays.ids) if a is not None]


def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty((), dtype=dtype).numpy().dtype


def to_cache(value: Any, entry: P.CacheEntry) -> Any:
    """What an entry keeps of a call's output (already projected to `entry.path`): the tensor,
    or its top-k log-probabilities at the entry's temperature."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{entry.id}` is a {type(value).__name__}: only a tensor output can be cached")
    if entry.topk is None:
        return value
    return topk_of(value, entry.topk, entry.temperature or 1.0)
