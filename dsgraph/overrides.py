"""`--set key=value` on the command line: pipeline settings (`steps=40`), model properties
(`student.clip=0.5`, `student.optimizer.lr=1e-4`) and generation properties
(`rollouts.temperature=0.7`), applied to the AST before lowering, so that
a bad value is reported like one written in the file, with a caret under the `--set` argument."""

from __future__ import annotations

import dataclasses

from dsgraph import catalogue
from dsgraph.diagnostics import Diagnostics, did_you_mean
from dsgraph.source import SourceFile, Span
from dsgraph.syntax import ast
from dsgraph.syntax.parse import parse_value


def apply_overrides(
    tree: ast.File, overrides: list[str], diags: Diagnostics, sources: dict[str, SourceFile]
) -> ast.File:
    for index, text in enumerate(overrides):
        source = SourceFile(f"--set[{index + 1}]", text)
        sources[source.name] = source
        key, eq, _ = text.partition("=")
        if not eq or not key.strip():
            diags.add(
                "DSG203",
                source.whole(),
                f"`--set {text}` is not `key=value`",
                "write e.g. `--set steps=40` or `--set student.optimizer.lr=1e-4`",
            )
            continue
        value = parse_value(source, len(key) + 1, diags)
        if value is None:
            continue
        tree = _apply(tree, key.strip().split("."), value, source, diags)
    return tree


def _apply(tree: ast.File, path: list[str], value: ast.Value, source: SourceFile, diags: Diagnostics) -> ast.File:
    key_span = source.span_at(0, len(".".join(path)))
    pipelines = [i for i in tree.items if isinstance(i, ast.Pipeline)]
    if len(pipelines) != 1:
        return tree
    pipeline = pipelines[0]
    items = list(pipeline.items)
    if len(path) == 1:
        if path[0] not in catalogue.SETTINGS:
            diags.add(
                "DSG207",
                key_span,
                f"`{path[0]}` is not a pipeline setting{did_you_mean(path[0], catalogue.SETTINGS)}",
                f"the settings are: {', '.join(catalogue.SETTINGS)}; a model property is `MODEL.PROPERTY`",
            )
            return tree
        setting = ast.Setting(ast.Name(path[0], key_span), value, key_span)
        items = [i for i in items if not (isinstance(i, ast.Setting) and i.name.text == path[0])] + [setting]
    elif any(isinstance(i, ast.GenerateDecl) and i.name.text == path[0] for i in items) and len(path) == 2:
        position = next(n for n, i in enumerate(items) if isinstance(i, ast.GenerateDecl) and i.name.text == path[0])
        generate = items[position]
        assert isinstance(generate, ast.GenerateDecl)
        if path[1] not in catalogue.GENERATION_PROPERTIES:
            diags.add(
                "DSG207",
                key_span,
                f"`{path[1]}` is not a generation property{did_you_mean(path[1], catalogue.GENERATION_PROPERTIES)}",
                f"a generation takes: {', '.join(catalogue.GENERATION_PROPERTIES)}",
            )
            return tree
        kept = [e for e in (generate.block.entries if generate.block else ()) if e.key.text != path[1]]
        entry = ast.Entry(ast.Name(path[1], key_span), value, key_span)
        items[position] = dataclasses.replace(
            generate, block=ast.Block((*kept, entry), generate.block.span if generate.block else key_span)
        )
    else:
        models = {i.name.text: n for n, i in enumerate(items) if isinstance(i, ast.ModelDecl)}
        if path[0] not in models:
            diags.add(
                "DSG201",
                key_span,
                f"there is no model `{path[0]}`{did_you_mean(path[0], models)}",
                "write `--set MODEL.PROPERTY=value` with a declared model, or `GENERATION.PROPERTY=value`",
            )
            return tree
        position = models[path[0]]
        decl = items[position]
        assert isinstance(decl, ast.ModelDecl)
        block = _set_property(decl.block, path[1:], value, key_span, diags)
        if block is None:
            return tree
        items[position] = dataclasses.replace(decl, block=block)
    return dataclasses.replace(
        tree, items=tuple(dataclasses.replace(pipeline, items=tuple(items)) if i is pipeline else i for i in tree.items)
    )


def _set_property(
    block: ast.Block | None, path: list[str], value: ast.Value, span: Span, diags: Diagnostics
) -> ast.Block | None:
    entries = list(block.entries) if block else []
    prop = path[0]
    if prop not in catalogue.MODEL_PROPERTIES:
        diags.add(
            "DSG207",
            span,
            f"`{prop}` is not a model property{did_you_mean(prop, catalogue.MODEL_PROPERTIES)}",
            f"a model block takes: {', '.join(catalogue.MODEL_PROPERTIES)}",
        )
        return None
    existing = next((n for n, e in enumerate(entries) if e.key.text == prop), None)
    if len(path) == 1:
        entry = ast.Entry(ast.Name(prop, span), value, span)
    else:
        current = entries[existing].value if existing is not None else None
        if existing is None or not isinstance(current, ast.CallValue):
            diags.add(
                "DSG207",
                span,
                f"the model has no `{prop}(...)` whose `{path[1]}` could be set",
                f"set the whole property instead, e.g. `--set MODEL.{prop}=adamw(lr=1e-3)`, "
                f"or declare `{prop} = ...` in the file",
            )
            return None
        args = [a for a in current.args if not (a.name and a.name.text == path[1])]
        args.append(ast.Arg(ast.Name(path[1], span), value, span))
        entry = dataclasses.replace(entries[existing], value=dataclasses.replace(current, args=tuple(args)))
    if existing is None:
        entries.append(entry)
    else:
        entries[existing] = entry
    return ast.Block(tuple(entries), block.span if block else span)
