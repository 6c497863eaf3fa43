"""The checkpoint manifest: what a checkpoint holds, as a typed and versioned JSON document, and
its validation before anything of the checkpoint is loaded. Imports no torch: the driver checks a
`--resume` here before any worker starts.

Layout, per step N (`step-0000000N`):
    ckpt/<model>/step-N/             each trained model's DeepSpeed checkpoint, its own folder
    ckpt/manifests/step-N.json      the manifest (JSON, never pickle), written last

A manifest is valid when it has the schema of this version and the digest of its own content (it
was not edited after it was saved), lists exactly the models its own identity trains, each in the
folder the layout names (inside the run directory, no symbolic links), holds one saved state per
rank, and every file of every folder is there with the size and SHA-256 digest recorded when it
was saved, and no other file is. Only then is a folder handed to DeepSpeed, whose loader
unpickles. A manifest that is not valid is skipped with a warning naming
the file and why, and the previous checkpoint is used."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsgraph.plan import Model, Plan, Source
from dsgraph.plan.codec import decode, encode
from dsgraph.source import InputTooLarge, read_bounded

MANIFEST_VERSION = 2
MAX_MANIFEST_BYTES = 64_000_000


class CheckpointInvalid(ValueError):
    """A checkpoint that must not be loaded, and why."""


@dataclass(frozen=True)
class SavedFile:
    path: str  # relative to the model's folder
    size: int
    sha256: str


@dataclass(frozen=True)
class SavedModel:
    name: str
    folder: str  # relative to the run directory: ckpt/<name>/step-N
    files: tuple[SavedFile, ...]


@dataclass(frozen=True)
class RankState:
    rng: dict[str, str]  # torch, python, numpy (and cuda) generator states
    data: dict[str, dict[str, Any]]  # data set -> its sampler's position


@dataclass(frozen=True)
class Manifest:
    step: int
    world_size: int
    identity: dict[str, Any]  # what a resumed run must share with the run that saved
    models: tuple[SavedModel, ...]
    ranks: tuple[RankState, ...]

    def digest(self) -> str:
        """A hash of the content: a manifest edited after it was saved no longer matches it."""
        return hashlib.sha256(json.dumps(encode(self, frozenset()), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        document = {"dsgraph_checkpoint": MANIFEST_VERSION, **encode(self, frozenset()), "digest": self.digest()}
        return json.dumps(document, indent=1) + "\n"


def tag(step: int) -> str:
    return f"step-{step:08d}"


def folder_of(model: str, step: int) -> str:
    return f"ckpt/{model}/{tag(step)}"


# -- what must not change between a checkpoint and its resume ----------------------------------


def identity(plan: Plan, base_dir: Path | None = None) -> dict[str, Any]:
    """The parts of a plan a resumed run must share with the run that saved: models (source, role,
    DeepSpeed config), losses, the training data (source, the content of a data file, and how it is
    dealt), seed and batch geometry. Steps, logging and checkpoint intervals, evaluations and eval
    sets may change."""

    def config(m: Model) -> dict[str, Any]:
        cfg: dict[str, Any] = json.loads(json.dumps(m.deepspeed_config))
        cfg.get("scheduler", {}).get("params", {}).pop("total_num_steps", None)
        # The batch geometry follows the settings and the world size, which are compared on their
        # own: one change, one difference.
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            cfg.pop(key, None)
        return cfg

    base = base_dir if base_dir is not None else Path(plan.file).parent
    s = plan.settings
    return {
        "models": {
            m.name: {"source": source_json(m.source), "role": m.role.value, "deepspeed_config": config(m)}
            for m in plan.models
        },
        "losses": {loss.name: loss.text for loss in plan.losses},
        "data": {
            d.name: {
                **source_json(d.source),
                "content": data_digest(d.source, base),
                "shuffle": d.shuffle,
                "drop_last": d.drop_last,
            }
            for d in plan.data
            if d.name not in {e.eval for e in plan.data}
        },
        "seed": s.seed,
        "micro_batch": s.micro_batch,
        "grad_accum": s.grad_accum,
    }


def source_json(source: Source) -> dict[str, Any]:
    """A source as JSON, without its span."""
    return {"kind": source.kind.value, "target": source.target, "args": [[k, v] for k, v in source.args]}


def data_digest(source: Source, base_dir: Path) -> str | None:
    """The SHA-256 of what a data set reads (its `path`): a file's bytes, or a directory's (a
    `save_to_disk` data set) files, each by its relative name and bytes; None when it reads none."""
    path = source.arg("path")
    return path_digest(base_dir / path) if isinstance(path, str) else None


def path_digest(root: Path) -> str | None:
    """The SHA-256 of a file's bytes, or of a directory's files, each by its relative name and
    bytes; None when it cannot be read (what reads it fails with its own message)."""
    try:
        if not root.is_dir():
            return _sha256(root)
        digest = hashlib.sha256()
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(root).as_posix()}\0{_sha256(file)}\0".encode())
        return digest.hexdigest()
    except OSError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """What differs, in words, with what it concerns: `setting:seed`, `model:student:KEY` (KEY:
    `source`, `role` or the first DeepSpeed config key that changed, `optimizer.params.lr`),
    `model:student` (new), `loss:kd`, `data:train`, `pipeline` (to point at the line that
    changed it)."""
    out: list[tuple[str, str]] = []
    for key in ("seed", "micro_batch", "grad_accum"):
        if saved.get(key) != current[key]:
            out.append((f"{key} was {saved.get(key)}, is now {current[key]}", f"setting:{key}"))
    for section, noun in (("models", "model"), ("losses", "loss"), ("data", "data set")):
        before_all, now_all = saved.get(section) or {}, current[section]
        for name in sorted(set(before_all) | set(now_all)):
            before, now = before_all.get(name), now_all.get(name)
            if before == now:
                continue
            where = f"{noun.split()[0]}:{name}"
            if before is None:
                out.append((f"{noun} `{name}` is new", where))
            elif now is None:
                out.append((f"{noun} `{name}` is gone", "pipeline"))
            elif section == "models":
                changed = [k for k in now if before.get(k) != now[k]]
                first = changed[0]  # what the caret points at: `source`, `role` or a config key
                if "deepspeed_config" in changed:
                    keys = changed_keys(before["deepspeed_config"], now["deepspeed_config"])
                    changed[changed.index("deepspeed_config")] = f"deepspeed_config ({', '.join(keys)})"
                    first = first if first != "deepspeed_config" else keys[0]
                out.append((f"{noun} `{name}` changed: {', '.join(changed)}", f"{where}:{first}"))
            elif section == "data" and {k: v for k, v in before.items() if k != "content"} == {
                k: v for k, v in now.items() if k != "content"
            }:
                out.append((f"the file of {noun} `{name}` changed since the checkpoint was saved", where))
            else:
                out.append((f"{noun} `{name}` changed: `{before}` -> `{now}`", where))
    return out


def changed_keys(before: Any, now: Any, prefix: str = "") -> list[str]:
    """The paths of the keys that differ between two configs (`optimizer.params.lr`)."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(before) | set(now)):
            out += changed_keys(before.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if before == now else [prefix or "(whole)"]


# -- reading and validating ---------------------------------------------------------------------


def read(path: Path, run_dir: Path, digests: bool = True) -> Manifest:
    """The manifest at `path`, validated against the files of `run_dir` (sizes always, digests
    when `digests`); CheckpointInvalid, with the reason, when it must not be loaded."""
    if path.is_symlink() or not path.is_file():  # a link, a FIFO (opening it would block), a device
        raise CheckpointInvalid("it is not a plain file")
    try:
        document = json.loads(read_bounded(path, MAX_MANIFEST_BYTES))
    except (OSError, ValueError, RecursionError, InputTooLarge) as error:
        raise CheckpointInvalid(f"it cannot be read: {error}") from None
    if not isinstance(document, dict) or document.get("dsgraph_checkpoint") != MANIFEST_VERSION:
        version = document.get("dsgraph_checkpoint") if isinstance(document, dict) else None
        raise CheckpointInvalid(f"it is not a manifest of version {MANIFEST_VERSION} (it says {version})")
    try:
        body = {k: v for k, v in document.items() if k not in ("dsgraph_checkpoint", "digest")}
        manifest: Manifest = decode(Manifest, body, frozenset())
    except (KeyError, TypeError, ValueError, RecursionError) as error:
        raise CheckpointInvalid(f"it does not have a manifest's shape: {error}") from None
    if "digest" not in document:
        raise CheckpointInvalid("it has no digest of its content (saved by another version of dsgraph?)")
    if document.get("digest") != manifest.digest():
        raise CheckpointInvalid("it was changed after it was saved (its digest does not match its content)")
    if not _is_identity(manifest.identity):
        raise CheckpointInvalid("it does not have a manifest's shape: its identity is not one")
    _check_layout(manifest, path)
    for model in manifest.models:
        _check_files(model, run_dir, digests)
    return manifest


def _check_layout(manifest: Manifest, path: Path) -> None:
    if path.name != f"{tag(manifest.step)}.json" or manifest.step < 1:
        raise CheckpointInvalid(f"it names step {manifest.step}, which is not the step of its file name")
    trained = sorted(name for name, m in (manifest.identity.get("models") or {}).items() if m.get("role") == "trained")
    listed = sorted(m.name for m in manifest.models)
    if not trained or listed != trained:
        raise CheckpointInvalid(f"it lists the models {listed or 'none'}, but its plan trains {trained or 'none'}")
    for model in manifest.models:
        if model.folder != folder_of(model.name, manifest.step):
            raise CheckpointInvalid(
                f"puts `{model.name}` in {model.folder!r}, not {folder_of(model.name, manifest.step)}"
            )
    if manifest.world_size < 1 or len(manifest.ranks) != manifest.world_size:
        raise CheckpointInvalid(f"it holds {len(manifest.ranks)} rank states for {manifest.world_size} processes")
    data = set(manifest.identity.get("data") or {})
    for rank in manifest.ranks:
        if set(rank.data) != data or not all(_is_position(p) for p in rank.data.values()):
            raise CheckpointInvalid("it holds a data position that is not one")
        if not _is_rng(rank.rng):
            raise CheckpointInvalid("it holds a random generator state that is not one")


def _is_identity(identity: dict[str, Any]) -> bool:
    """The shape `identity` writes, so that comparing it with a plan's cannot fail."""

    def table(value: Any, entry: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and entry(v) for k, v in value.items())

    def source(value: Any) -> bool:
        return isinstance(value, dict) and isinstance(value.get("kind"), str) and isinstance(value.get("args"), list)

    def model(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and set(value) == {"source", "role", "deepspeed_config"}
            and source(value["source"])
            and isinstance(value["role"], str)
            and isinstance(value["deepspeed_config"], dict)
        )

    return (
        set(identity) == {"models", "losses", "data", "seed", "micro_batch", "grad_accum"}
        and table(identity["models"], model)
        and table(identity["losses"], lambda v: isinstance(v, str))
        and table(identity["data"], source)
        and all(_count(identity[k]) for k in ("seed", "micro_batch", "grad_accum"))
    )


def _is_position(state: Any) -> bool:
    return (
        isinstance(state, dict)
        and _count(state.get("epoch"))
        and _count(state.get("position"))
        and _base64(state.get("generator"))
    )


GENERATOR_PREFIX = "generate/"  # a generation's sampling generator, among a rank's random states


def _is_rng(state: dict[str, str]) -> bool:
    """The shapes `checkpoint.rng_state` saves: torch's (and CUDA's) bytes, Python's and NumPy's
    states as JSON; and each generation's sampling generator (`generate/NAME`), as bytes."""
    generators = {k for k in state if k.startswith(GENERATOR_PREFIX)}
    if not {"torch", "python", "numpy"} <= set(state) - generators <= {"torch", "python", "numpy", "cuda"}:
        return False
    if not all(_base64(state[k]) for k in generators):
        return False
    try:
        python, numpy = json.loads(state["python"]), json.loads(state["numpy"])
    except ValueError:
        return False
    return (
        _base64(state["torch"])
        and _base64(state.get("cuda", "AA=="))
        and isinstance(python, list)
        and len(python) == 3
        and isinstance(python[1], list)
        and all(_count(v) for v in python[1])
        and isinstance(numpy, list)
        and len(numpy) == 5
        and isinstance(numpy[1], list)
        and all(_count(v) for v in numpy[1])
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _base64(value: Any) -> bool:
    if not isinstance(value, str) or not value:
        return False
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


def _check_files(model: SavedModel, run_dir: Path, digests: bool) -> None:
    """Every file recorded is there, whole and unchanged, inside the run directory; nothing else."""
    folder = run_dir / model.folder
    root = os.path.realpath(run_dir)
    if os.path.realpath(folder) != os.path.join(root, model.folder) or not folder.is_dir():
        raise CheckpointInvalid(f"it names {folder} for `{model.name}`, which is not a folder of the run directory")
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() or p.is_symlink()}
    recorded = {f.path for f in model.files}
    if on_disk != recorded:
        extra, missing = sorted(on_disk - recorded), sorted(recorded - on_disk)
        raise CheckpointInvalid(
            f"it does not match {folder}: "
            + "; ".join(
                part
                for part in (f"missing {missing}" if missing else "", f"not recorded {extra}" if extra else "")
                if part
            )
        )
    for record in model.files:
        path = folder / record.path
        if path.is_symlink() or not path.is_file():
            raise CheckpointInvalid(f"it names {path}, which is not a plain file")
        size = path.stat().st_size
        if size != record.size:
            raise CheckpointInvalid(f"{path} is {size:,} bytes, {record.size:,} when it was saved (truncated?)")
        if digests and _sha256(path) != record.sha256:
            raise CheckpointInvalid(f"{path} changed since it was saved (its SHA-256 differs)")


def saved_files(folder: Path, names: list[str]) -> list[SavedFile]:
    """The records of some files of a model's folder (each rank digests its share)."""
    return [SavedFile(name, (folder / name).stat().st_size, _sha256(folder / name)) for name in names]


def newest(run_dir: Path) -> tuple[Manifest, Path, list[str]]:
    """The newest valid checkpoint of `run_dir`, and a warning for each newer one skipped;
    CheckpointInvalid (with every reason) when there is none."""
    folder = run_dir / "ckpt" / "manifests"
    skipped: list[str] = []
    for path in sorted(folder.glob("step-*.json"), reverse=True) if folder.is_dir() else []:
        try:
            return read(path, run_dir), path, skipped
        except CheckpointInvalid as error:
            skipped.append(f"{path}: {error}")
    partial = incomplete(run_dir)
    reasons = skipped + ([f"{len(partial)} incomplete checkpoint folder(s), never used"] if partial else [])
    raise CheckpointInvalid("; ".join(reasons) or "no checkpoint")


def incomplete(run_dir: Path) -> list[Path]:
    ckpt = run_dir / "ckpt"
    return sorted(ckpt.glob("*/*.partial")) if ckpt.is_dir() else []
