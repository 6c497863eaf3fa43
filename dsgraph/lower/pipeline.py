"""AST -> IR: one pipeline, names resolved, settings typed, defaults filled (DSG106, DSG2xx)."""

from __future__ import annotations

import dataclasses
from typing import Any

from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.dsconfig.zero import ZeroBuilder
from dsgraph.load import Loaded, SharedZero
from dsgraph.lower.losses import LossLowering
from dsgraph.lower.models import ModelLowering
from dsgraph.lower.settings import lower_settings
from dsgraph.lower.sources import lower_source
from dsgraph.lower.values import INVALID, block_entries, check_type, to_python
from dsgraph.plan import DataSet, Source, SourceKind
from dsgraph.source import SourceFile, Span
from dsgraph.syntax import ast


def lower(loaded: Loaded, diags: Diagnostics, sources: dict[str, SourceFile]) -> ir.Pipeline | None:
    """The IR of the file's one pipeline (DSG106 when it declares none or several). `sources`
    receives the DeepSpeed JSON files its `zero` blocks read."""
    pipelines = [item for item in loaded.tree.items if isinstance(item, ast.Pipeline)]
    if len(pipelines) != 1:
        span = pipelines[1].name.span if pipelines else loaded.source.whole()
        diags.add(
            "DSG106",
            span,
            f"a .dsg file declares exactly one pipeline; this one has {len(pipelines)}",
            "write `pipeline NAME { ... }`; share ZeRO configs between files with `include`",
        )
        return None
    return _Lowerer(loaded.source.name, diags, sources).pipeline(pipelines[0], loaded.zeros, loaded.complete)


class _Lowerer:
    def __init__(self, filename: str, diags: Diagnostics, sources: dict[str, SourceFile]):
        self.filename = filename
        self.diags = diags
        self.sources = sources
        self.names: dict[str, Span] = {}  # data, model and loss names share one namespace
        self.zero_names: dict[str, Span] = {}

    def pipeline(
        self, node: ast.Pipeline, shared_zeros: tuple[SharedZero, ...], includes_loaded: bool
    ) -> ir.Pipeline | None:
        items = node.items
        settings = lower_settings([i for i in items if isinstance(i, ast.Setting)], node, self.diags)
        builder = ZeroBuilder(self.filename, self.diags, self.sources)
        zeros: dict[str, ir.ZeroConfig] = {}
        own = [SharedZero(i, self.filename) for i in items if isinstance(i, ast.ZeroDecl)]
        for decl, filename in ((z.decl, z.file) for z in (*shared_zeros, *own)):
            if self._declare(decl.name, self.zero_names, "ZeRO config"):
                local = builder if filename == self.filename else ZeroBuilder(filename, self.diags, self.sources)
                zeros[decl.name.text] = local.build(decl.name.text, decl.span, decl.file, decl.block)
        data: dict[str, DataSet | None] = {}  # None: declared, with errors
        for data_decl in (i for i in items if isinstance(i, ast.DataDecl)):
            if self._declare(data_decl.name, self.names, "name"):
                data[data_decl.name.text] = self._data(data_decl)
        model_decls = [i for i in items if isinstance(i, ast.ModelDecl)]
        generate_decls = [i for i in items if isinstance(i, ast.GenerateDecl)]
        reward_decls = [i for i in items if isinstance(i, ast.RewardDecl)]
        loss_decls = [i for i in items if isinstance(i, ast.LossDecl)]
        models_ok = [d for d in model_decls if self._declare(d.name, self.names, "name")]
        generates_ok = [d for d in generate_decls if self._declare(d.name, self.names, "name")]
        rewards_ok = [d for d in reward_decls if self._declare(d.name, self.names, "name")]
        losses_ok = [d for d in loss_decls if self._declare(d.name, self.names, "name")]
        models: dict[str, ir.Model] = {}
        model_lowering = ModelLowering(self.diags, self.zero_names, builder, includes_loaded)
        for model_decl in models_ok:
            model = model_lowering.model(model_decl, zeros)
            if model is not None:
                models[model.name] = model
        data = self._eval_sets(data)
        generations: dict[str, ir.Generation] = {}
        for generate_decl in generates_ok:
            generation = self._generation(generate_decl, data, {d.name.text for d in models_ok}, settings)
            if generation is not None:
                generations[generation.name] = generation
        rewards: dict[str, ir.Reward] = {}
        for reward_decl in rewards_ok:
            reward_source = lower_source(reward_decl.source, catalogue.REWARDS, "reward", self.diags)
            if reward_source is not None:
                rewards[reward_decl.name.text] = ir.Reward(reward_decl.name.text, reward_source, reward_decl.span)
        lowering = LossLowering(
            data,
            {d.name.text for d in models_ok},
            {d.name.text for d in losses_ok},
            self.diags,
            {d.name.text for d in generates_ok},
            {d.name.text for d in rewards_ok},
        )
        losses: dict[str, ir.Loss] = {}
        for loss_decl in losses_ok:
            expr = lowering.lower(loss_decl.expr)
            if expr is not None:
                losses[loss_decl.name.text] = ir.Loss(loss_decl.name.text, expr, loss_decl.span)
        trains = self._trains(
            [i for i in items if isinstance(i, ast.TrainStmt)],
            {d.name.text for d in models_ok},
            {d.name.text for d in losses_ok},
        )
        if settings is None:
            return None
        return ir.Pipeline(
            node.name.text,
            self.filename,
            settings,
            {k: v for k, v in data.items() if v is not None},
            zeros,
            models,
            losses,
            tuple(trains),
            node.span,
            complete=not self.diags.has_errors,
            generations=generations,
            rewards=rewards,
        )

    def _declare(self, name: ast.Name, table: dict[str, Span], kind: str) -> bool:
        if name.text in table:
            self.diags.add(
                "DSG202",
                name.span,
                f"`{name.text}` is declared twice",
                "rename one of the two declarations",
                Note("first declared here", table[name.text]),
            )
            return False
        table[name.text] = name.span
        return True

    def _data(self, decl: ast.DataDecl) -> DataSet | None:
        source = lower_source(decl.source, catalogue.DATA, "data set", self.diags)
        options = self._data_options(decl)
        if source is None or options is None:
            return None
        form = source.arg("format", "prompt_completion")
        if source.target == "hf_dataset" and form not in (*_HF_DATASET_LIKE, "raw"):
            self.diags.add(
                "DSG209",
                source.span,
                f'`format` must be one of {", ".join(_HF_DATASET_LIKE)}, raw, not "{form}"',
                'write `format = "prompt_completion"` (the default), "preference", "chat" or "raw"',
            )
            return None
        fields = _builtin_fields(source) if source.kind is SourceKind.BUILTIN else None
        return DataSet(decl.name.text, source, fields, decl.span, **options)

    def _data_options(self, decl: ast.DataDecl) -> dict[str, Any] | None:
        """The data block: `eval = NAME`, `shuffle`, `drop_last`, `workers` (DSG203, DSG207-DSG209);
        None when one is wrong. The eval set's name is resolved once every name is declared."""
        options: dict[str, Any] = {}
        owner = f"data set `{decl.name.text}`"
        for entry in block_entries(decl.block, catalogue.DATA_PROPERTIES, "data set", owner, self.diags):
            key = entry.key.text
            spec = catalogue.DATA_PROPERTIES[key]
            if key == "eval":
                if not isinstance(entry.value, ast.Ident):
                    self.diags.add(
                        "DSG203",
                        (entry.value or entry).span,
                        "`eval` names another data set: its eval split",
                        "declare it with `data val = ...` and write `eval = val`",
                    )
                    options[key] = INVALID
                    continue
                options["eval"], options["eval_span"] = entry.value.name, entry.value.span
                continue
            if key == "collate":
                options[key] = self._collate(entry)
                continue
            value: Any = True if entry.value is None and spec.type == "bool" else None
            if entry.value is not None:
                value = to_python(entry.value, self.diags)
            if value is None:
                self.diags.add("DSG203", entry.span, f"`{key}` needs a value", f"write `{key} = ...`")
                value = INVALID
            elif value is not INVALID and check_type(
                spec.type, value, (entry.value or entry).span, f"`{key}`", self.diags
            ):
                if key == "workers" and value < 0:
                    self.diags.add(
                        "DSG209",
                        (entry.value or entry).span,
                        f"`workers` must be 0 or more, not {value}",
                        "write 0 to load batches in the training process itself",
                    )
                    value = INVALID
            else:
                value = INVALID
            options[key] = value
        return None if INVALID in options.values() else options

    def _collate(self, entry: ast.Entry) -> Any:
        """`collate = my.pkg:make(...)`: a factory called once per loader at run time; what it
        returns is the DataLoader's `collate_fn`."""
        value = entry.value
        if not isinstance(value, ast.FactoryValue) or any(a.name is None for a in value.args):
            self.diags.add(
                "DSG203",
                (value or entry).span,
                "`collate` names a factory, `package.module:function(...)`, with named arguments",
                "write `collate = my_project.data:make_collate(pad_id=0)`; it returns the collate function",
            )
            return INVALID
        args = []
        for arg in value.args:
            python = to_python(arg.value, self.diags)
            if python is INVALID:
                return INVALID
            assert arg.name is not None
            args.append((arg.name.text, python))
        return Source(SourceKind.FACTORY, value.target, tuple(args), value.span)

    def _eval_sets(self, data: dict[str, DataSet | None]) -> dict[str, DataSet | None]:
        """Each `eval = NAME` names a data set that is not itself, has no eval set of its own and
        serves one data set only (DSG201, DSG209, DSG212); a wrong one is left out."""
        served: dict[str, DataSet] = {}
        out = dict(data)
        for name, ds in data.items():
            if ds is None or ds.eval is None:
                continue
            assert ds.eval_span is not None
            target = data.get(ds.eval)
            problem: tuple[str, str, str] | None = None
            notes: list[Note] = []
            if ds.eval not in data:
                if ds.eval in self.names:
                    problem = (
                        "DSG212",
                        f"`{ds.eval}` is not a data set",
                        "`eval` names a data set declared with `data`",
                    )
                else:
                    problem = (
                        "DSG201",
                        f"there is no data set `{ds.eval}`{did_you_mean(ds.eval, set(data))}",
                        f"declare it: `data {ds.eval} = ...`",
                    )
            elif ds.eval == name:
                problem = ("DSG209", f"data set `{name}` cannot be its own eval set", "declare a held-out data set")
            elif target is not None and target.eval is not None:
                problem = (
                    "DSG209",
                    f"`{ds.eval}` has an eval set of its own, so it cannot be one",
                    f"remove `eval = {target.eval}` from `{ds.eval}`",
                )
            elif ds.eval in served:
                problem = (
                    "DSG209",
                    f"`{ds.eval}` is already the eval set of `{served[ds.eval].name}`",
                    "give each data set its own eval set",
                )
                notes.append(Note("named here first", served[ds.eval].eval_span))
            if problem is not None:
                code, message, help_text = problem
                self.diags.add(code, ds.eval_span, message, help_text, *notes)
                out[name] = dataclasses.replace(ds, eval=None, eval_span=None)
                continue
            served[ds.eval] = ds
        return out

    # -- generations ---------------------------------------------------------------------------

    def _generation(
        self, decl: ast.GenerateDecl, data: dict[str, DataSet | None], models: set[str], settings: ir.Settings | None
    ) -> ir.Generation | None:
        """`generate NAME = MODEL(DATA) { samples = 4 ... }`: the model and data set exist, each
        property has its type and range (DSG201, DSG203, DSG207-DSG209, DSG212)."""
        ok = True
        for name, table, kind, what in (
            (decl.model, models, "model", "a model declared with `model`"),
            (decl.data, set(data), "data set", "a data set of prompts declared with `data`"),
        ):
            if name.text not in table:
                ok = False
                self._wrong_name(name, table, kind, f"`generate` takes {what}")
        if decl.data.text in data and data[decl.data.text] is None:
            ok = False  # its own errors are reported where it is declared
        values: dict[str, Any] = {p.name: p.default for p in catalogue.GENERATION_PROPERTIES.values()}
        spans: dict[str, Span] = {}
        owner = f"generation `{decl.name.text}`"
        for entry in block_entries(decl.block, catalogue.GENERATION_PROPERTIES, "generation", owner, self.diags):
            key = entry.key.text
            spec = catalogue.GENERATION_PROPERTIES[key]
            span = (entry.value or entry).span
            value = to_python(entry.value, self.diags) if entry.value is not None else None
            if value is INVALID or not check_type(spec.type, value, span, f"`{key}`", self.diags):
                ok = False
                continue
            problem = _generation_range(key, value)
            if problem is not None:
                self.diags.add("DSG209", span, *problem)
                ok = False
                continue
            values[key], spans[key] = value, entry.span
        every = settings.checkpoint_every if settings else 0
        if values["iterations"] > 1 and every % values["iterations"]:
            self.diags.add(
                "DSG209",
                spans["iterations"],
                f"`iterations = {values['iterations']}` keeps each batch of rollouts for {values['iterations']} steps, "
                f"but `checkpoint_every = {every}` saves between them: a resume would sample them again",
                f"make `checkpoint_every` a multiple of {values['iterations']}",
                *([Note("`checkpoint_every` is set here", settings.spans["checkpoint_every"])] if settings else []),
            )
            ok = False
        if not ok:
            return None
        return ir.Generation(
            decl.name.text,
            decl.model.text,
            decl.data.text,
            values["samples"],
            values["max_new_tokens"],
            float(values["temperature"]),
            float(values["top_p"]),
            tuple(values["stop"]),
            values["gather"],
            decl.span,
            spans,
            model_span=decl.model.span,
            data_span=decl.data.span,
            iterations=values["iterations"],
        )

    # -- train statements ----------------------------------------------------------------------

    def _trains(self, nodes: list[ast.TrainStmt], models: set[str], losses: set[str]) -> list[ir.Train]:
        trains = []
        for index, node in enumerate(nodes):
            ok = True
            for name in node.models:
                if name.text not in models:
                    ok = False
                    self._wrong_name(name, models, "model", "`train` takes a model declared with `model` here")
            if node.loss.text not in losses:
                ok = False
                self._wrong_name(node.loss, losses, "loss", "`train` takes a loss declared with `loss` here")
            if ok:
                trains.append(
                    ir.Train(
                        index,
                        tuple(n.text for n in node.models),
                        tuple(n.span for n in node.models),
                        node.loss.text,
                        node.loss.span,
                        node.span,
                    )
                )
        return trains

    def _wrong_name(self, name: ast.Name, candidates: set[str], kind: str, help_text: str) -> None:
        """A name that is not a declared `kind`: another kind's (DSG212), or nothing's (DSG201)."""
        if name.text in self.names:
            self.diags.add("DSG212", name.span, f"`{name.text}` is not a {kind}", help_text)
        else:
            self.diags.add(
                "DSG201",
                name.span,
                f"there is no {kind} `{name.text}`{did_you_mean(name.text, candidates)}",
                help_text,
            )


def _generation_range(key: str, value: Any) -> tuple[str, str] | None:
    """(message, help) when a generation property is out of its range."""
    if key in ("samples", "max_new_tokens", "iterations") and value < 1:
        return f"`{key}` must be 1 or more, not {value}", f"write e.g. `{key} = 4`"
    if key == "temperature" and value < 0:
        return f"`temperature` must be 0 (greedy) or more, not {value}", "write e.g. `temperature = 1.0`"
    if key == "top_p" and not 0 < value <= 1:
        return f"`top_p` must be in (0, 1], not {value}", "write e.g. `top_p = 0.9`, or 1.0 to keep every token"
    if key == "gather" and value not in catalogue.GATHER_MODES:
        return (
            f'`gather` must be one of {", ".join(catalogue.GATHER_MODES)}, not "{value}"',
            "`gather = once` gathers a ZeRO-3 model's weights for the whole generation, `layers` one layer at a time",
        )
    if key == "stop" and any(v < 0 for v in value):
        return "`stop` lists token ids, 0 or more", "write e.g. `stop = [10]`"
    return None


# hf_dataset's `format` -> the built-in whose fields it gives
_HF_DATASET_LIKE = {
    "prompt_completion": "prompt_completion",
    "chat": "prompt_completion",
    "preference": "preference_pairs",
}


def _builtin_fields(source: Source) -> tuple[str, ...] | None:
    """The fields a built-in data set gives, when the compiler can know them: fixed, or named by
    its arguments (`jsonl`'s `fields`, `hf_dataset`'s `format` and `columns`)."""
    args = dict(source.args)
    spec = catalogue.DATA[source.target]
    if spec.fields is not None:
        return spec.fields
    if source.target == "hf_dataset":
        like = _HF_DATASET_LIKE.get(args.get("format", "prompt_completion"))
        if like is not None:
            return catalogue.DATA[like].fields
        columns = args.get("columns")
        return tuple(columns) if isinstance(columns, dict) and columns else None
    return tuple(args["fields"]) if args.get("fields") else None
