"""The checks of `generate` declarations (DSG321-DSG326; DSG320 is the hoisting stage's): what a
generation needs of its model, its prompts and the losses that read it, known before the run
where the sources say it. Reads Hugging Face config files (as dsgraph/cachesize.py does); imports
no torch and no user code, and says nothing about factories or configs it cannot read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from dsgraph import catalogue, ir
from dsgraph import graph as g
from dsgraph.diagnostics import Diagnostic, Note, diagnostic
from dsgraph.plan import DataSet, SourceKind
from dsgraph.source import Span

if TYPE_CHECKING:
    from dsgraph.checks import Context

PROMPT_FIELDS = ("input_ids", "attention_mask")  # what a generation reads of its data set
_CAUSAL_CLASSES = ("ForCausalLM", "LMHeadModel")  # the "architectures" of a causal LM
_POSITION_KEYS = ("n_positions", "max_position_embeddings")


@dataclass(frozen=True)
class _Facts:
    """What the source says of a model; None where it does not say."""

    not_causal: str | None  # why it is not a causal LM ("is `builtin.mlp`")
    positions: tuple[int, str] | None  # (the most positions, where that number is written)
    vocab: tuple[int, str] | None  # (the vocabulary's size, where that number is written)


def _facts(model: ir.Model, base: Path) -> _Facts:
    source = model.source
    if source.kind is SourceKind.BUILTIN:
        if source.target != "causal_lm":
            return _Facts(f"is `builtin.{source.target}`", None, None)
        spec = catalogue.MODELS["causal_lm"]
        positions = source.arg("max_len", spec.param("max_len").default)  # type: ignore[union-attr]
        vocab = source.arg("vocab", spec.param("vocab").default)  # type: ignore[union-attr]
        return _Facts(None, (positions, f"max_len = {positions}"), (vocab, f"vocab = {vocab}"))
    if source.kind is not SourceKind.HF:
        return _Facts(None, None, None)  # a factory's model: only the run knows it
    task = source.arg("task")
    config = _hf_config(source.arg("config"), source.arg("0"), base)
    not_causal = None
    if isinstance(task, str) and task != "causal_lm":
        not_causal = f'is built for `task="{task}"`'
    elif task is None and config is not None:
        classes = config.get("architectures")
        if isinstance(classes, list) and classes and not any(str(c).endswith(_CAUSAL_CLASSES) for c in classes):
            not_causal = f'is a `{classes[0]}` (its config\'s "architectures")'
    if config is None:
        return _Facts(not_causal, None, None)
    positions = next(((config[k], k) for k in _POSITION_KEYS if _count(config.get(k))), None)
    vocab = config.get("vocab_size")
    return _Facts(
        not_causal,
        (positions[0], f"{positions[1]} = {positions[0]}") if positions else None,
        (vocab, f"vocab_size = {vocab}") if _count(vocab) else None,
    )


def _count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _hf_config(inline: Any, directory: Any, base: Path) -> dict[str, Any] | None:
    """An `hf(...)` model's config: written in the file, a config file, or its directory's
    config.json; None when it cannot be read here."""
    if isinstance(inline, dict):
        return inline
    if isinstance(inline, str):
        path = base / inline
    elif isinstance(directory, str):
        path = base / directory / "config.json"
    else:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _prompts(data: DataSet) -> tuple[int, str] | None:
    """(max_length, tokenizer) of a `builtin.prompts(...)` data set; None for any other."""
    source = data.source
    if source.kind is not SourceKind.BUILTIN or source.target != "prompts":
        return None
    spec = catalogue.DATA["prompts"]
    length = source.arg("max_length", spec.param("max_length").default)  # type: ignore[union-attr]
    tokenizer = source.arg("tokenizer", spec.param("tokenizer").default)  # type: ignore[union-attr]
    return (length, tokenizer) if isinstance(length, int) and isinstance(tokenizer, str) else None


def _readers(ctx: Context, gen: ir.Generation) -> list[tuple[str, Span]]:
    """The models called on the generation's fields, with the span of their first such call, in
    source order; the generator first."""
    found: dict[str, Span] = {gen.model: gen.model_span or gen.span}
    calls = [
        ctx.graph.nodes[n]
        for n in ctx.graph.successors(g.generation_id(gen.name))
        if ctx.graph.nodes[n]["kind"] == "call"
    ]
    for node in sorted(calls, key=lambda n: (n["span"].file, n["span"].line, n["span"].col)):
        found.setdefault(node["model"], node["span"])
    return [(name, span) for name, span in found.items() if name in ctx.pipeline.models]


def check_generations(ctx: Context) -> Iterator[Diagnostic]:
    """DSG321 a generator that is not a causal LM, DSG323 prompts plus new tokens longer than a
    model's positions, DSG324 byte-tokenized prompts for a smaller vocabulary, DSG325 an eval set
    on the prompts, DSG326 prompts without input_ids and attention_mask."""
    p = ctx.pipeline
    base = Path(p.file).parent
    eval_reported: set[str] = set()
    for gen in p.generations.values():
        model, data = p.models.get(gen.model), p.data.get(gen.data)
        if model is None or data is None:
            continue
        facts = {gen.model: _facts(model, base)}
        if facts[gen.model].not_causal is not None:
            yield diagnostic(
                "DSG321",
                gen.model_span or gen.span,
                f"generation `{gen.name}` samples from model `{gen.model}`, which "
                f"{facts[gen.model].not_causal}, not a causal language model",
                "generate from a causal LM: `builtin.causal_lm(...)`, or `hf(...)` of a ...ForCausalLM "
                'model (`task="causal_lm"`)',
                Note(f"`{gen.model}` is declared here", model.span),
            )
        if data.eval is not None and data.eval_span is not None and data.name not in eval_reported:
            eval_reported.add(data.name)
            yield diagnostic(
                "DSG325",
                data.eval_span,
                f"data set `{data.name}` holds the prompts of generation `{gen.name}`, whose completions are "
                f"not evaluated: its eval set `{data.eval}` would never be read",
                f"remove `eval = {data.eval}` from `{data.name}`",
                Note(f"`{gen.name}` reads `{data.name}` here", gen.data_span or gen.span),
            )
        missing = [f for f in PROMPT_FIELDS if data.fields is not None and f not in data.fields]
        if missing:
            yield diagnostic(
                "DSG326",
                gen.data_span or gen.span,
                f"generation `{gen.name}` reads prompts from `{data.name}`, which has no field "
                f"{' or '.join(f'`{f}`' for f in missing)}",
                "generate from a data set of prompts, e.g. `builtin.prompts(path=...)`: left-padded `input_ids` "
                "and their `attention_mask`",
                Note(
                    f"`{data.name}` is declared here (its fields: {', '.join(data.fields or ()) or 'none'})", data.span
                ),
            )
            continue
        prompts = _prompts(data)
        if prompts is None or facts[gen.model].not_causal is not None:
            continue
        readers = _readers(ctx, gen)
        for name, _ in readers:
            facts.setdefault(name, _facts(p.models[name], base))
        yield from _too_long(gen, data, prompts[0], readers, facts, p)
        if prompts[1] == "bytes":
            yield from _byte_vocab(gen, data, readers, facts, p)


def _too_long(
    gen: ir.Generation,
    data: DataSet,
    length: int,
    readers: list[tuple[str, Span]],
    facts: dict[str, _Facts],
    p: ir.Pipeline,
) -> Iterator[Diagnostic]:
    """DSG323: the rollouts are `length + max_new_tokens` tokens long, from the first column (the
    prompts are left-padded to `max_length`); every model that reads them needs as many positions."""
    total = length + gen.max_new_tokens
    short = [
        (name, f.positions) for name, f in ((n, facts[n]) for n, _ in readers) if f.positions and total > f.positions[0]
    ]
    if not short:
        return
    fewest = min(positions for _, (positions, _) in short)
    if len(short) == 1:
        models = f"the {short[0][1][0]} positions of model `{short[0][0]}`"
    else:
        models = "the positions of models " + " and ".join(f"`{name}` ({n})" for name, (n, _) in short)
    if fewest > length:
        fix = f"lower `max_new_tokens` to {fewest - length} or less (or the `max_length` of `{data.name}`)"
    else:
        fix = f"lower `max_length` of `{data.name}` below {fewest} and `max_new_tokens` to fit"
    yield diagnostic(
        "DSG323",
        gen.spans.get("max_new_tokens", gen.span),
        f"generation `{gen.name}` makes sequences of {total} tokens ({length} of prompt, the `max_length` of "
        f"`{data.name}`, and {gen.max_new_tokens} new), more than {models}",
        f"{fix}, or use a model with more positions",
        *(Note(f"`{name}` is declared here ({where})", p.models[name].span) for name, (_, where) in short),
    )


def _byte_vocab(
    gen: ir.Generation,
    data: DataSet,
    readers: list[tuple[str, Span]],
    facts: dict[str, _Facts],
    p: ir.Pipeline,
) -> Iterator[Diagnostic]:
    """DSG324: `tokenizer = "bytes"` gives ids up to catalogue.BYTE_VOCAB - 1 (the start and end
    tokens among them); a smaller embedding of the generator, or of a model that reads the
    rollouts, has no row for them. (A tokenizer directory's size is known only once the run loads
    it: not checked here.)"""
    small = []
    for name, span in readers:
        vocab = facts[name].vocab
        if vocab is not None and vocab[0] < catalogue.BYTE_VOCAB:
            small.append((name, span, vocab))
    if not small:
        return
    if len(small) == 1:
        models = f"model `{small[0][0]}` has a vocabulary of {small[0][2][0]}"
    else:
        models = "models " + " and ".join(f"`{name}` ({vocab})" for name, _, (vocab, _) in small) + " have fewer"
    yield diagnostic(
        "DSG324",
        small[0][1],
        f"the prompts of generation `{gen.name}` are tokenized as bytes (ids 0 to {catalogue.BYTE_VOCAB - 1}), "
        f"but {models}",
        f"give the model a vocabulary of {catalogue.BYTE_VOCAB} or more, or tokenize `{data.name}` with the "
        'model\'s own tokenizer (`tokenizer="path/to/tokenizer"`)',
        *(Note(f"`{name}` is declared here ({where})", p.models[name].span) for name, _, (_, where) in small),
        Note(f"`{data.name}` is tokenized as bytes here", data.span),
    )


def _subexpressions(expr: ir.LossExpr) -> Iterator[ir.LossExpr]:
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        match node:
            case ir.ModelCall(args=a, kwargs=k) | ir.LossFn(args=a, kwargs=k):
                stack.extend(reversed([*a, *(x for _, x in k)]))
            case ir.Project(obj=o):
                stack.append(o)
            case ir.BinOp(left=l, right=r):
                stack.extend((r, l))
            case ir.Neg(operand=o):
                stack.append(o)


def check_group_samples(ctx: Context) -> Iterator[Diagnostic]:
    """DSG322: a group-relative loss (`grpo`) over a generation of one completion per prompt:
    each completion's advantage is its reward against its group's, so a group of one has none."""
    p = ctx.pipeline
    readers: dict[str, list[Span]] = {}
    for loss in p.losses.values():
        for node in _subexpressions(loss.expr):
            if not (isinstance(node, ir.LossFn) and node.builtin and node.fn == "grpo"):
                continue
            rollouts = node.args[1] if len(node.args) > 1 else dict(node.kwargs).get("rollouts")
            if isinstance(rollouts, ir.Generated) and rollouts.field is None:
                readers.setdefault(rollouts.generation, []).append(node.span)
    for name, spans in readers.items():
        gen = p.generations.get(name)
        if gen is None or gen.samples >= 2:
            continue
        yield diagnostic(
            "DSG322",
            gen.spans.get("samples", gen.span),
            f"`grpo` compares each completion with the others of its prompt's group, but generation `{name}` "
            f"samples {gen.samples} per prompt",
            f"set `samples = 2` or more in `{name}` (GRPO commonly uses 8 or more)",
            *(Note(f"`grpo` reads `{name}` here", span) for span in spans),
        )
