"""What a cache of hoisted outputs will hold, known before the run where the sources say it: the
rows of a data set and the bytes of one cached row. None where only the run can tell (a factory's
data or model, a file that is not there yet). Reads data files and Hugging Face configs; imports
no torch and no user code."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dsgraph import catalogue, ir
from dsgraph.plan import DataSet, Precision, SourceKind

TOPK_ENTRY_BYTES = 4 + 4  # a float32 log-probability and an int32 token id per kept class

_LINE_FILES = ("jsonl", "prompt_completion", "preference_pairs")
_TOKENIZED = ("prompt_completion", "preference_pairs", "hf_dataset")


def data_rows(data: DataSet, base: Path) -> int | None:
    """The samples of a data set: a built-in's `samples`, the records of a JSONL file, the rows of
    a `datasets` split saved with save_to_disk."""
    source = data.source
    if source.kind is not SourceKind.BUILTIN:
        return None
    if source.target.startswith("synthetic_"):
        samples = source.arg("samples")
        return samples if isinstance(samples, int) else None
    path = source.arg("path") or source.arg("0")
    if not isinstance(path, str):
        return None
    if source.target in _LINE_FILES:
        try:
            with open(base / path, "rb") as file:
                return sum(1 for line in file if line.strip())
        except OSError:
            return None
    if source.target == "hf_dataset":
        return _arrow_rows(base / path / str(source.arg("split", "train")))
    return None


def _arrow_rows(split: Path) -> int | None:
    """Rows of a split written by `save_to_disk` (Arrow stream files); None for anything else."""
    files = sorted(split.glob("data-*.arrow")) if split.is_dir() else []
    if not files:
        return None
    import pyarrow as pa  # type: ignore[import-untyped]  # only for a cached call over such a split

    try:
        return int(sum(pa.ipc.open_stream(pa.memory_map(str(f))).read_all().num_rows for f in files))
    except (OSError, pa.ArrowInvalid):
        return None


def sequence_length(data: DataSet) -> int | None:
    """The padded length of a tokenized data set's sequences."""
    source = data.source
    if source.kind is not SourceKind.BUILTIN:
        return None
    if source.target == "synthetic_tokens":
        length = source.arg("length")
        return length if isinstance(length, int) else None
    if source.target in _TOKENIZED:
        return int(source.arg("max_length", catalogue.DATA[source.target].param("max_length").default))  # type: ignore[union-attr]
    return None


def output_shape(model: ir.Model, data: DataSet, path: tuple[str, ...], base: Path) -> tuple[int, ...] | None:
    """The shape of one sample's output at `path` (`.logits`), where the source says it."""
    source = model.source
    if source.kind is SourceKind.BUILTIN and source.target == "mlp" and not path:
        outputs = source.arg("outputs")
        return (outputs,) if isinstance(outputs, int) else None
    length = sequence_length(data)
    if source.kind is SourceKind.BUILTIN and source.target == "causal_lm" and not path and length:
        return (length, int(source.arg("vocab", 256)))
    if source.kind is SourceKind.HF and path == ("logits",):
        config = _hf_config(source.arg("config"), source.arg("0"), base)
        if config is None:
            return None
        task = source.arg("task") or _task(config)
        if task == "causal_lm" and length and isinstance(config.get("vocab_size"), int):
            return (length, config["vocab_size"])
        if task == "sequence_classification":
            return (int(config.get("num_labels") or len(config.get("id2label") or {}) or 2),)
    return None


def _hf_config(inline: Any, directory: Any, base: Path) -> dict[str, Any] | None:
    if isinstance(inline, dict):
        return inline
    if not isinstance(directory, str):
        return None
    try:
        config = json.loads((base / directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _task(config: dict[str, Any]) -> str | None:
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "sequence_classification"
    return None


def row_bytes(shape: tuple[int, ...], precision: Precision, topk: int | None) -> int:
    """Bytes of one cached row: the whole output in the model's precision, or at each position
    (every dimension but the last, the classes) the K largest log-probabilities and their ids."""
    if topk is not None:
        return math.prod(shape[:-1]) * min(topk, shape[-1]) * TOPK_ENTRY_BYTES
    return math.prod(shape) * (4 if precision is Precision.FP32 else 2)
