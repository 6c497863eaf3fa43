"""`zero` declarations -> ZeroConfig: inline blocks, DeepSpeed JSON files, and files with overrides.

Shorthands (`stage`, `offload_optimizer = cpu`, `offload_param`, `precision`) expand into
DeepSpeed's own shape; every other key goes where DeepSpeed expects it (zero_optimization or the
top level). Unknown keys are reported with a did-you-mean, in the .dsg file or in the JSON file."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dsgraph.dsconfig import keys as dskeys
from dsgraph.catalogue import OFFLOAD_DEVICES, PRECISIONS
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.ir import ZeroConfig
from dsgraph.plan import Precision
from dsgraph.source import InputTooLarge, SourceFile, Span, read_bounded
from dsgraph.syntax import ast
from dsgraph.lower.values import INVALID, describe, to_python

# Bucket sizes left to DeepSpeed's defaults allocate ~2 GB per backward; dsgraph sizes them from
# the model at run time unless the block says otherwise.
INLINE_DEFAULTS = {
    1: {"reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
    2: {"reduce_bucket_size": "auto", "allgather_bucket_size": "auto"},
    3: {
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
    },
}


class ZeroBuilder:
    def __init__(self, dsg_file: str, diags: Diagnostics, sources: dict[str, SourceFile]):
        self.base = Path(dsg_file).parent
        self.diags = diags
        self.sources = sources  # JSON files read here are added, for caret rendering

    def build(self, name: str, decl_span: Span, file: ast.CallValue | None, block: ast.Block | None) -> ZeroConfig:
        config: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        rel = None
        if file is not None:
            rel = self._file_arg(file)
            if rel is not None:
                config, spans = self._load_json(rel, file)
        precision = _precision_of_json(config, spans, decl_span, self.diags)
        if block is not None:
            precision = self._apply_block(block, config, spans) or precision
            if file is None:
                stage = config.get("zero_optimization", {}).get("stage", 0)
                for key, value in INLINE_DEFAULTS.get(stage if isinstance(stage, int) else 0, {}).items():
                    config.setdefault("zero_optimization", {}).setdefault(key, value)
        return ZeroConfig(name, config, rel, precision, spans, decl_span)

    # -- files ---------------------------------------------------------------------------------

    def _file_arg(self, call: ast.CallValue) -> str | None:
        args = call.args
        if (
            call.name.text != "file"
            or len(args) != 1
            or args[0].name is not None
            or not isinstance(args[0].value, ast.String)
        ):
            self.diags.add(
                "DSG203",
                call.span,
                'a ZeRO config file is written `file("path.json")`',
                "give the path of a DeepSpeed JSON file, relative to this .dsg file",
            )
            return None
        return args[0].value.value

    def _load_json(self, rel: str, call: ast.CallValue) -> tuple[dict[str, Any], dict[str, Span]]:
        path = self.base / rel
        arg_span = call.args[0].value.span
        if not path.is_file():
            self.diags.add(
                "DSG409",
                arg_span,
                f"DeepSpeed config file `{rel}` does not exist",
                f"paths are relative to the .dsg file; looked for {path}",
            )
            return {}, {}
        display = str(path)
        try:
            text = read_bounded(path, MAX_CONFIG_BYTES)
        except InputTooLarge as error:
            self.diags.add(
                "DSG410",
                arg_span,
                f"DeepSpeed config file `{rel}` is {error.size:,} bytes long; it was not read",
                f"a DeepSpeed config is a few kilobytes; at most {error.limit:,} bytes are read",
            )
            return {}, {}
        except OSError as error:
            self.diags.add(
                "DSG409",
                arg_span,
                f"DeepSpeed config file `{rel}` cannot be read: {error.strerror or error}",
                f"check the file's permissions; looked for {path}",
            )
            return {}, {}
        source = SourceFile(display, text)
        self.sources[display] = source
        deep = _too_deep_json(text)
        if deep is not None:  # json.loads and every walk over the config would recurse
            self.diags.add(
                "DSG410",
                source.span_at(deep),
                f"`{rel}` nests deeper than {_MAX_JSON_DEPTH} levels",
                "a DeepSpeed config nests a few levels deep; this is not one",
                Note("used here", arg_span),
            )
            return {}, {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            at = source.span_at(error.pos)
            self.diags.add(
                "DSG410",
                at,
                f"`{rel}` is not valid JSON: {error.msg}",
                "DeepSpeed reads strict JSON: no trailing commas, no comments, keys in double quotes",
                Note("used here", arg_span),
            )
            return {}, {}
        if not isinstance(data, dict):
            self.diags.add(
                "DSG410",
                source.whole(),
                f"`{rel}` holds {describe(data)}, not a JSON object",
                "a DeepSpeed config is one JSON object `{...}`",
                Note("used here", arg_span),
            )
            return {}, {}
        spans = _locate_keys(data, source)
        self._check_keys(data, "", spans, arg_span)
        _check_types(data, "", spans, arg_span, self.diags)
        return data, spans

    def _check_keys(self, obj: dict[str, Any], path: str, spans: dict[str, Span], fallback: Span) -> None:
        """DSG408 for each unknown key, which is then dropped (as DeepSpeed would ignore it)."""
        allowed = dskeys.known_children(path)
        if allowed is None:
            return
        unknown = []
        for key, value in obj.items():
            full = f"{path}.{key}" if path else key
            if key not in allowed:
                where = f"in `{path}`" if path else "at the top level"
                self.diags.add(
                    "DSG408",
                    spans.get(full, fallback),
                    f"DeepSpeed has no key `{key}` {where}{did_you_mean(key, allowed)}",
                    "DeepSpeed would silently ignore it; fix the spelling or remove it",
                )
                unknown.append(key)
            elif isinstance(value, dict):
                self._check_keys(value, full, spans, fallback)
        for key in unknown:
            del obj[key]

    # -- inline blocks -------------------------------------------------------------------------

    def _apply_block(self, block: ast.Block, config: dict[str, Any], spans: dict[str, Span]) -> Precision | None:
        precision = None
        for entry in block.entries:
            key, span = entry.key.text, entry.span
            value = True if entry.value is None else to_python(entry.value, self.diags)
            if value is INVALID:
                continue
            if key == "precision":
                if value in PRECISIONS:
                    precision = Precision(value)
                    spans["precision"] = span
                else:
                    self.diags.add(
                        "DSG209",
                        entry.value.span if entry.value else span,
                        f"precision must be one of {', '.join(PRECISIONS)}, not {describe(value)}",
                        "write `precision = bf16` (or fp32, fp16)",
                    )
                continue
            if key in ("offload_optimizer", "offload_param") and isinstance(value, str):
                if value not in OFFLOAD_DEVICES:
                    self.diags.add(
                        "DSG209",
                        entry.value.span if entry.value else span,
                        f"`{key}` must be one of {', '.join(OFFLOAD_DEVICES)}, not {describe(value)}",
                        f'write `{key} = cpu`, or a block `{key} = {{ device = nvme  nvme_path = "/x" }}`',
                    )
                    continue
                value = {"device": value}
            if key in dskeys.ZERO:
                path = f"zero_optimization.{key}"
                config.setdefault("zero_optimization", {})[key] = value
            elif key in dskeys.TOP_LEVEL:
                path = key
                config[key] = value
            else:
                self.diags.add(
                    "DSG408",
                    entry.key.span,
                    f"DeepSpeed has no key `{key}`{did_you_mean(key, dskeys.ZERO | dskeys.TOP_LEVEL | {'precision'})}",
                    "zero blocks take ZeRO keys (stage, offload_optimizer, ...), top-level "
                    "DeepSpeed keys, and `precision`",
                )
                continue
            spans[path] = span
            value_spans = {path: entry.value.span if entry.value else span}
            if isinstance(entry.value, ast.Block):
                _nested_spans(entry.value, path, spans, value_spans)
            if isinstance(value, dict):
                self._check_keys(value, path, spans, entry.key.span)
            _check_types(config, path, value_spans, value_spans[path], self.diags)
        return precision


def _nested_spans(block: ast.Block, path: str, entries: dict[str, Span], values: dict[str, Span]) -> None:
    """The spans of a nested block's entries and of their values, by dotted path."""
    for entry in block.entries:
        full = f"{path}.{entry.key.text}"
        entries[full] = entry.span
        values[full] = entry.value.span if entry.value else entry.span
        if isinstance(entry.value, ast.Block):
            _nested_spans(entry.value, full, entries, values)


def _check_types(
    config: dict[str, Any], under: str, spans: dict[str, Span], fallback: Span, diags: Diagnostics
) -> None:
    """DSG411 for the keys of dskeys.TYPES set in `config` at `under` or inside it ("": all),
    and DSG209 for a stage other than 0-3. A value reported is dropped from `config`, so that
    what reads the config later finds only values of the right type."""
    bad = []
    for path, kind in dskeys.TYPES.items():
        if under and path != under and not path.startswith(under + "."):
            continue
        parent: Any = config
        parts = path.split(".")
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or parts[-1] not in parent:
            continue
        value, span = parent[parts[-1]], spans.get(path, fallback)
        if value is None and path in dskeys.NULLABLE:
            continue
        if not _type_ok(kind, value):
            words = dskeys.TYPE_WORDS[kind]
            diags.add(
                "DSG411",
                span,
                f"DeepSpeed key `{path}` must be {words}, not {describe(value)}",
                f"write {words}" + ("" if kind == dskeys.OBJ else ', or "auto" where dsgraph can fill it'),
            )
            bad.append((parent, parts[-1]))
        elif path == "zero_optimization.stage" and value != "auto" and value not in (0, 1, 2, 3):
            diags.add(
                "DSG209",
                span,
                f"ZeRO stage must be 0, 1, 2 or 3, not {describe(value)}",
                "write `stage = 3` to shard parameters, gradients and optimizer state",
            )
            bad.append((parent, parts[-1]))
    for parent, key in bad:
        del parent[key]


def _type_ok(kind: str, value: Any) -> bool:
    if kind == dskeys.OBJ:
        return isinstance(value, dict)
    if value == "auto":
        return True
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {dskeys.INT: number and float(value).is_integer(), dskeys.NUM: number, dskeys.BOOL: isinstance(value, bool)}[
        kind
    ]


def _precision_of_json(
    config: dict[str, Any], spans: dict[str, Span], fallback: Span, diags: Diagnostics
) -> Precision | None:
    enabled = [p for p in ("bf16", "fp16") if isinstance(config.get(p), dict) and config[p].get("enabled") is True]
    if len(enabled) == 2:
        diags.add(
            "DSG414",
            spans.get("fp16", fallback),
            "this config enables both fp16 and bf16",
            "enable one of them",
            Note("bf16 is enabled here", spans.get("bf16")),
        )
        return None
    return Precision(enabled[0]) if enabled else None


_MAX_JSON_DEPTH = 100
MAX_CONFIG_BYTES = 1_000_000


def _too_deep_json(text: str) -> int | None:
    """The offset of the first bracket nested deeper than _MAX_JSON_DEPTH (strings skipped)."""
    depth, in_string, i, n = 0, False, 0, len(text)
    while i < n:
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > _MAX_JSON_DEPTH:
                return i
        elif char in "]}":
            depth -= 1
        i += 1
    return None


_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def _locate_keys(data: dict[str, Any], source: SourceFile) -> dict[str, Span]:
    """Spans of the keys of a JSON object, as dotted paths: a single left-to-right scan that
    follows the nesting of braces, so equal key names in different objects are told apart."""
    spans: dict[str, Span] = {}
    stack: list[str] = []  # the path of the object we are in
    pending: str | None = None  # the last key seen, before its value opens an object
    text = source.text
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            match = _KEY.match(text, i)
            if match:
                pending = match.group(1)
                path = ".".join([*stack[1:], pending])
                spans.setdefault(path, source.span_at(i, len(match.group(0)) - 1))
                i = match.end()
                continue
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            i = end + 1
            continue
        if char == "{":
            stack.append(pending or "")
            pending = None
        elif char == "}" and stack:
            stack.pop()
        elif char in ",[":
            pending = None if char == "," else pending
        i += 1
    return spans
