"""Resolving a plan's sources at run time: built-ins, `package.module:function` factories and
Hugging Face models from a local directory or a config (nothing is downloaded).

Factories are imported as written in the .dsg file, from the installed packages and the .dsg
file's own directory (put first on sys.path, like a script's directory); never from the current
directory otherwise."""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

from dsgraph.context import RunContext
from dsgraph.plan import Source, SourceKind
from dsgraph.runtime import builtins


class SourceError(Exception):
    """A source could not be resolved or built; the executor adds the plan step and the line."""


def set_import_path(dsg_file: str) -> None:
    here = str(Path(dsg_file).resolve().parent)
    sys.path[:] = [p for p in sys.path if p not in ("", ".", str(Path.cwd()))]
    if here not in sys.path:
        sys.path.insert(0, here)


def resolve_factory(target: str) -> Callable[..., Any]:
    module_name, _, function = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SourceError(f"cannot import module `{module_name}` for `{target}`: {error}") from error
    fn = getattr(module, function, None)
    if not callable(fn):
        raise SourceError(f"module `{module_name}` has no function `{function}`")
    return fn


def _takes_run(factory: Callable[..., Any]) -> bool:
    try:
        parameter = inspect.signature(factory).parameters.get("run")
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return False
    return parameter is not None and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)


def call_args(args: tuple[tuple[str, Any], ...]) -> tuple[list[Any], dict[str, Any]]:
    positional = [v for k, v in args if k.isdigit()]
    keywords = {k: v for k, v in args if not k.isdigit()}
    return positional, keywords


def build(
    source: Source,
    table: dict[str, Callable[..., Any]],
    base_dir: Path,
    weights: bool = True,
    run: RunContext | None = None,
    quantization: Any = None,
) -> Any:
    """weights=False: an hf directory's model from its config alone (the meta-device estimate).
    `run`: passed to a factory that declares a keyword parameter named `run`. `quantization`: the
    BitsAndBytesConfig an hf directory's model is loaded with (adapters.quantization_config)."""
    kind, target = source.kind, source.target
    positional, keywords = call_args(source.args)
    if kind is SourceKind.BUILTIN:
        # Files a built-in reads are relative to the .dsg file, like everything it names.
        if "path" in keywords:
            keywords["path"] = str(base_dir / keywords["path"])
        if keywords.get("tokenizer", "bytes") != "bytes":
            keywords["tokenizer"] = str(base_dir / keywords["tokenizer"])
        return table[target](*positional, **keywords)
    if kind is SourceKind.FACTORY:
        factory = resolve_factory(target)
        if run is not None and "run" not in keywords and _takes_run(factory):
            keywords["run"] = run
        return factory(*positional, **keywords)
    return build_hf(positional, keywords, base_dir, weights, quantization)


_HF_CLASSES = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "model": "AutoModel",
}


def hf_task(config: Any, task: str | None) -> str:
    """The task written in the file, else the one the config's "architectures" names
    (`GPT2LMHeadModel` -> causal_lm, `BertForSequenceClassification` -> sequence_classification),
    else causal_lm."""
    if task is not None:
        return task
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForSequenceClassification"):
            return "sequence_classification"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal_lm"
    return "causal_lm"


def model_task(source: Source, model: Any) -> str | None:
    """The Hugging Face task of a built model (None for other models)."""
    if source.kind is not SourceKind.HF:
        return None
    return hf_task(getattr(model, "config", None), source.arg("task"))


def hf_config(positional: list[Any], keywords: dict[str, Any], base_dir: Path) -> Any:
    """The model's config: from its directory, a config file, or the block written in the file."""
    import transformers

    trust = bool(keywords.get("trust_remote_code", False))  # only when the file says so
    config = keywords.get("config")
    if config is None:
        path = base_dir / positional[0]
        if not path.is_dir():
            raise SourceError(f"hf model directory {path} does not exist (nothing is downloaded)")
        return transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=trust, local_files_only=True)
    if isinstance(config, str):
        return transformers.AutoConfig.from_pretrained(
            str(base_dir / config), trust_remote_code=trust, local_files_only=True
        )
    config = dict(config)
    if "model_type" not in config:
        raise SourceError('hf(config={...}) needs a `model_type`, e.g. `model_type = "gpt2"`')
    return transformers.AutoConfig.for_model(config.pop("model_type"), **config)


def build_hf(
    positional: list[Any], keywords: dict[str, Any], base_dir: Path, weights: bool = True, quantization: Any = None
) -> Any:
    """An AutoModelFor... from a local directory (with its weights) or from a config (fresh
    weights). weights=False builds a directory's model from its config alone (the memory estimate
    builds on the meta device). `quantization`: a BitsAndBytesConfig; the directory's weights are
    loaded in 4 bits, in the dtype they are packed in (outside zero.Init: the caller's context)."""
    import transformers

    config = hf_config(positional, keywords, base_dir)
    task = hf_task(config, keywords.pop("task", None))
    if task not in _HF_CLASSES:
        raise SourceError(f"hf task must be one of {', '.join(_HF_CLASSES)}, not {task!r}")
    auto = getattr(transformers, _HF_CLASSES[task])
    trust = bool(keywords.pop("trust_remote_code", False))
    if "config" in keywords or not weights:
        keywords.pop("config", None)
        return auto.from_config(config, trust_remote_code=trust, **keywords)
    if quantization is not None:
        keywords["quantization_config"] = quantization
        keywords["dtype"] = quantization.bnb_4bit_quant_storage
    return auto.from_pretrained(
        str(base_dir / positional[0]), local_files_only=True, trust_remote_code=trust, **keywords
    )


def model_table() -> dict[str, Callable[..., Any]]:
    return builtins.MODELS


def data_table() -> dict[str, Callable[..., Any]]:
    return builtins.DATA
