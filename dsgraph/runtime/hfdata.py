"""`builtin.hf_dataset`: a Hugging Face `datasets` data set from local files, tokenized like the
JSONL built-ins. `path` is a directory written by `save_to_disk` (a Dataset or a DatasetDict),
or a .parquet/.json/.jsonl/.csv file or a directory of them (its splits named by `datasets`, from
the file names: "train" unless they say otherwise). Nothing is downloaded; `datasets` is imported
only when such a data set is built."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dsgraph.runtime.tokenizer import Tokenizer, load_tokenizer

# What each text format reads, by the names `columns` renames: `{ prompt = "question" }`.
TEXT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "chat": ("messages",),
}
FORMATS = (*TEXT_KEYS, "raw")
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def hf_dataset(
    path: str,
    split: str = "train",
    format: str = "prompt_completion",
    columns: dict[str, str] | None = None,
    tokenizer: str = "bytes",
    max_length: int = 128,
) -> Dataset:
    """format "prompt_completion" and "chat": input_ids, attention_mask, labels (-100 but on the
    completion / the assistant's turns); "preference": chosen_* and rejected_* of those, like
    builtin.preference_pairs; "raw": the numeric columns (those `columns` names, renamed) as tensors."""
    from dsgraph.runtime.builtins import (  # builtins imports this module
        TensorRecords,
        _padded,
        encode_completions,
        encode_preferences,
    )

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    renames = _renames(columns, TEXT_KEYS.get(format))
    needed = list(renames.values()) if format == "raw" else [renames.get(k, k) for k in TEXT_KEYS[format]]
    data = _load_split(path, split, text=needed if format != "raw" else [])
    where = f"{path} [{split}]"
    missing = [c for c in needed if c not in data.column_names]
    if missing:
        raise ValueError(f"{where} has no column {missing[0]!r}; its columns: {', '.join(data.column_names)}")
    if len(data) == 0:
        raise ValueError(f"{where} holds no records")
    if format == "raw":
        return TensorRecords(_numeric(data, renames, where))
    tok = load_tokenizer(tokenizer, Path("."))
    records = list(_text_records(data, {k: renames.get(k, k) for k in TEXT_KEYS[format]}, where))
    if format == "chat":
        rows = [_encode_chat(tok, r["messages"], max_length, f"{where} record {n}") for n, r in enumerate(records, 1)]
        return TensorRecords(_padded(rows, max_length, tok.pad_token_id))
    if format == "prompt_completion":
        return encode_completions(tok, records, max_length, where)
    return encode_preferences(tok, records, max_length, where)


def _renames(columns: Any, keys: tuple[str, ...] | None) -> dict[str, str]:
    """`columns`, checked: {field: column}; for a text format, fields of that format only."""
    if columns is None:
        return {}
    if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
        raise ValueError(f'columns must be a block of column names, like {{ prompt = "question" }}, not {columns!r}')
    unknown = [k for k in columns if keys is not None and k not in keys]
    if unknown:
        raise ValueError(f"columns: {unknown[0]!r} is not a field of this format; it reads {', '.join(keys or ())}")
    return dict(columns)


def _load_split(path: str, split: str, text: list[str]) -> Any:
    """One split of a `save_to_disk` directory or of data files; `text`: CSV columns read as text
    (not as numbers, which would turn "07" into 7)."""
    import datasets  # type: ignore[import-untyped]

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path} does not exist (nothing is downloaded)")
    with _quiet(datasets):
        if root.is_dir() and any((root / f).exists() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(root))
        else:
            files = [root] if root.is_file() else [f for f in sorted(root.rglob("*")) if f.suffix in _BUILDERS]
            builders = {_BUILDERS.get(f.suffix) for f in files}
            if not files or len(builders) != 1 or None in builders:
                raise ValueError(
                    f"{path} is neither a save_to_disk directory nor .parquet, .json, .jsonl or .csv files of one kind"
                )
            builder = builders.pop()
            options = {"converters": {c: str for c in text}} if builder == "csv" else {}
            source = {"data_files": str(root)} if root.is_file() else {"data_dir": str(root)}
            loaded = datasets.load_dataset(builder, **source, **options)
    if isinstance(loaded, datasets.Dataset):  # a saved Dataset: one split, "train" unless it says
        loaded = datasets.DatasetDict({loaded.split or "train": loaded})
    if split not in loaded:
        raise ValueError(f"{path} has no split {split!r}; its splits: {', '.join(loaded)}")
    return loaded[split]


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars while loading (every rank loads), as they were after."""
    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def _text_records(data: Any, fields: dict[str, str], where: str) -> Iterator[dict[str, Any]]:
    """Each record's fields (renamed), checked: text, or for `messages` a list of text turns."""
    for number, row in enumerate(data.select_columns(sorted(set(fields.values()))), 1):
        record = {field: row[column] for field, column in fields.items()}
        if "messages" in record:
            record["messages"] = _messages(record["messages"], f"{where} record {number}")
            yield record
            continue
        bad = [fields[k] for k, v in record.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{where} record {number}: needs the text field(s) {', '.join(bad)}")
        yield record


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    turns = value if isinstance(value, list) else []
    if not turns or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in turns
    ):
        raise ValueError(f'{where}: messages must be a list of {{"role": ..., "content": ...}} texts')
    if not any(m["role"] == "assistant" for m in turns):
        raise ValueError(f"{where}: has no assistant turn, nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in turns]


def _encode_chat(
    tok: Tokenizer, messages: list[dict[str, str]], max_length: int, where: str
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and their labels (only on the assistant's turns),
    cut at max_length."""
    try:
        ids, labels = tok.encode_chat(messages)
    except Exception as error:  # a template that refuses the conversation (roles, their order)
        raise ValueError(f"{where}: {error}") from None
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == -100 for label in labels):
        raise ValueError(
            f"{where}: no assistant token within max_length {max_length}; raise max_length or shorten the conversation"
        )
    return ids, labels


def _numeric(data: Any, renames: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """The numeric columns (numbers, booleans, lists of them) as tensors: those `renames` names,
    renamed, else every numeric column."""
    import pyarrow as pa  # type: ignore[import-untyped]

    def numeric(kind: Any) -> bool:
        while pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            kind = kind.value_type
        return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind))

    schema = data.data.schema
    chosen = renames or {c: c for c in data.column_names if numeric(schema.field(c).type)}
    if not chosen:
        raise ValueError(f"{where} has no numeric column; its columns: {', '.join(data.column_names)}")
    tensors = {}
    for name, column in chosen.items():
        if not numeric(schema.field(column).type):
            raise ValueError(f"{where}: column {column!r} is not numeric ({schema.field(column).type})")
        values = list(data[column])
        for number, value in enumerate(values, 1):
            if value is None or _shape(value) != _shape(values[0]):
                raise ValueError(f"{where} record {number}: column {column!r} is empty or of another shape")
        tensors[name] = torch.tensor(values)
    return tensors


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a number or nested list; None for a missing value or a ragged list."""
    if value is None:
        return None
    if not isinstance(value, list):
        return ()
    inner = {_shape(v) for v in value}
    if len(inner) > 1:
        return None
    rest = inner.pop() if inner else ()
    return None if rest is None else (len(value), *rest)
