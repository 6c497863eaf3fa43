"""Sources of models and data sets to `plan.Source`: built-ins, factories and Hugging Face models."""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path
from typing import Any

from dsgraph import catalogue
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.lower.values import INVALID, bind_args, describe, to_python
from dsgraph.plan import Source, SourceKind
from dsgraph.source import SourceFile, Span
from dsgraph.syntax import ast


def _keyword_span(node: ast.Source, name: str) -> Span:
    return next(a.value.span for a in node.args if a.name and a.name.text == name)


def lower_source(node: ast.Source, table: dict[str, catalogue.Builtin], kind: str, diags: Diagnostics) -> Source | None:
    """Where a model or data set comes from: `builtin.NAME(...)` bound against the catalogue,
    `package.module:function(...)` or `hf(...)` (DSG203-DSG206, DSG209, DSG213)."""
    if node.factory is not None:
        args = _free_args(node.args, diags)
        return Source(SourceKind.FACTORY, node.factory, args, node.span) if args is not None else None
    path = [n.text for n in node.path]
    if path == ["hf"] and kind == "model":
        args = _free_args(node.args, diags)
        if args is None:
            return None
        if not args or not ((args[0][0] == "0" and isinstance(args[0][1], str)) or any(k == "config" for k, _ in args)):
            diags.add(
                "DSG205",
                node.span,
                "`hf` needs a local directory or a config",
                'write `hf("path/to/model")` or `hf(config="config.json")`',
            )
            return None
        named = dict(args)
        if "task" in named and named["task"] not in catalogue.HF_TASKS:
            diags.add(
                "DSG209",
                _keyword_span(node, "task"),
                f"hf task must be one of {', '.join(catalogue.HF_TASKS)}, not {describe(named['task'])}",
                "leave `task` out to use the class the model's "
                'config names (its "architectures"), or write e.g. `task="causal_lm"`',
            )
            return None
        if isinstance(named.get("config"), dict) and "model_type" not in named["config"]:
            diags.add(
                "DSG205",
                _keyword_span(node, "config"),
                "`hf(config={...})` needs a `model_type`",
                'add e.g. `model_type = "gpt2"`: Transformers picks the config class from it',
            )
            return None
        target = named.get("0", named.get("config"))
        return Source(SourceKind.HF, target if isinstance(target, str) else "config", args, node.span)
    if len(path) == 2 and path[0] == "builtin":
        spec = table.get(path[1])
        if spec is None:
            diags.add(
                "DSG206",
                node.path[1].span,
                f"there is no built-in {kind} `{path[1]}`{did_you_mean(path[1], table)}",
                f"the built-in {kind}s are: {', '.join(table)}",
            )
            return None
        bound = bind_args(spec, kind, node.args, node.span, diags)
        if bound is None:
            return None
        return Source(SourceKind.BUILTIN, spec.name, tuple(sorted(bound.items())), node.span)
    written = ".".join(path)
    diags.add(
        "DSG213",
        node.span,
        f"`{written}(...)` is not a {kind} source",
        f"write `builtin.NAME(...)`, `package.module:function(...)`{' or `hf(...)`' if kind == 'model' else ''}",
    )
    return None


def _free_args(args: tuple[ast.Arg[ast.Value], ...], diags: Diagnostics) -> tuple[tuple[str, Any], ...] | None:
    """A factory's or hf's arguments as they are written: nothing to bind them against."""
    out, ok = [], True
    for i, arg in enumerate(args):
        value = to_python(arg.value, diags)
        ok = ok and value is not INVALID
        out.append((arg.name.text if arg.name else str(i), value))
    return tuple(out) if ok else None


def check_hf_paths(node: ast.Source, source: Source, dsg: SourceFile, diags: Diagnostics) -> None:
    """DSG214, a warning: `hf("dir")` or `hf(config="file.json")` names a path that does not exist
    on this machine (relative to the .dsg file, as the run resolves it; nothing is downloaded).
    The plan does not depend on the machine, so `check` and `compile` only warn; `dsgraph run`
    does not start. Only stats the path. The help names the command that makes it when a comment
    line of the file says so (`maker`)."""
    rel, directory = source.arg("0"), True
    if not isinstance(rel, str):
        rel, directory = source.arg("config"), False
        if not isinstance(rel, str):
            return
    looked = str(Path(dsg.name).parent / rel)
    if os.path.isdir(looked) if directory else os.path.isfile(looked):
        return
    span = next(a.value.span for a in node.args if a.name is None) if directory else _keyword_span(node, "config")
    what = "hf model directory" if directory else "hf config file"
    there = f" (looked for {looked})" if looked != rel else ""
    fault = f"is not a {'directory' if directory else 'file'}" if os.path.lexists(looked) else "does not exist"
    made = maker(dsg, rel)
    if made is None:
        fix = (
            "save the model there (`save_pretrained`), or point `hf(...)` at a saved one"
            if directory
            else "write a Transformers config.json there, or point `config=` at one"
        )
        diags.add(
            "DSG214",
            span,
            f"{what} `{rel}` {fault}{there}",
            f"{fix}: paths are relative to the .dsg file and nothing is downloaded; "
            "`dsgraph run` does not start without it",
        )
        return
    command, where = made
    diags.add(
        "DSG214",
        span,
        f"{what} `{rel}` {fault}{there}",
        f"write it with `{command}`, or point `hf(...)` at a saved model; `dsgraph run` does not start without it",
        Note("this file says how it is made", where),
    )


_WRITES = re.compile(r"writes[ \t]+(?P<path>[^\s(),;`]+)")


def maker(dsg: SourceFile, rel: str) -> tuple[str, Span] | None:
    """The command that writes `rel`, as a comment line of the .dsg file says it: the first
    whole-line comment `#   COMMAND   writes PATH` (two spaces or a tab before `writes`) whose PATH
    is `rel` or a folder above it (`writes tiny/` covers `hf("tiny/teacher")`), both relative to
    the .dsg file; with the span of COMMAND. Linear in the file's length."""
    wanted = _parts(rel)
    for number, line in enumerate(dsg.text.splitlines(), 1):
        if "writes" not in line or not line.lstrip(" \t").startswith("#"):
            continue
        for found in _WRITES.finditer(line):
            at = found.start()
            if line[at - 1 : at] != "\t" and (at < 2 or line[at - 2 : at] != "  "):
                continue  # `writes` in prose, or inside the command
            command = line[:at].lstrip(" \t")[1:].strip(" \t")
            if not command:
                continue
            path = _parts(found["path"])
            if path and wanted[: len(path)] == path:
                col = line.index(command, line.index("#")) + 1
                return command, Span(dsg.name, number, col, number, col + len(command))
            break
    return None


def _parts(path: str) -> tuple[str, ...]:
    """`./tiny/teacher/` -> ("tiny", "teacher"); an absolute path starts with "/"."""
    norm = posixpath.normpath(path.replace("\\", "/"))
    return ("/",) * norm.startswith("/") + tuple(p for p in norm.split("/") if p not in ("", "."))
