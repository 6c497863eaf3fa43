"""AST -> IR: one pipeline, names resolved, settings typed, defaults filled (DSG106, DSG2xx)."""
from __future__ import annotations

from typing import Any

from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.dsconfig.zero import ZeroBuilder
from dsgraph.load import Loaded, SharedZero
from dsgraph.lower.losses import LossLowering
from dsgraph.lower.values import INVALID, bind_args, check_type, describe, to_python
from dsgraph.plan import Lora, Precision, Source, SourceKind
from dsgraph.source import SourceFile, Span
from dsgraph.syntax import ast


def lower(loaded: Loaded, diags: Diagnostics, sources: dict[str, SourceFile]) -> ir.Pipeline | None:
    """The IR of the file's one pipeline (DSG106 when it declares none or several). `sources`
    receives the DeepSpeed JSON files its `zero` blocks read."""
    pipelines = [item for item in loaded.tree.items if isinstance(item, ast.Pipeline)]
    if len(pipelines) != 1:
        span = pipelines[1].name.span if pipelines else loaded.source.whole()
        diags.add("DSG106", span, f"a .dsg file declares exactly one pipeline; this one has {len(pipelines)}",
                  "write `pipeline NAME { ... }`; share ZeRO configs between files with `include`")
        return None
    return _Lowerer(loaded.source.name, diags, sources).pipeline(pipelines[0], loaded.zeros)


def _keyword_span(node: ast.Source, name: str) -> Span:
    return next(a.value.span for a in node.args if a.name and a.name.text == name)


class _Lowerer:
    def __init__(self, filename: str, diags: Diagnostics, sources: dict[str, SourceFile]):
        self.filename = filename
        self.diags = diags
        self.sources = sources
        self.names: dict[str, Span] = {}        # data, model and loss names share one namespace
        self.zero_names: dict[str, Span] = {}

    def pipeline(self, node: ast.Pipeline, shared_zeros: tuple[SharedZero, ...]) -> ir.Pipeline | None:
        items = node.items
        settings = self._settings([i for i in items if isinstance(i, ast.Setting)], node)
        builder = ZeroBuilder(self.filename, self.diags, self.sources)
        zeros: dict[str, ir.ZeroConfig] = {}
        own = [SharedZero(i, self.filename) for i in items if isinstance(i, ast.ZeroDecl)]
        for decl, filename in ((z.decl, z.file) for z in (*shared_zeros, *own)):
            if self._declare(decl.name, self.zero_names, "ZeRO config"):
                local = builder if filename == self.filename else ZeroBuilder(filename, self.diags, self.sources)
                zeros[decl.name.text] = local.build(decl.name.text, decl.span, decl.file, decl.block)
        data: dict[str, ir.DataSet | None] = {}       # None: declared, with errors
        for data_decl in (i for i in items if isinstance(i, ast.DataDecl)):
            if self._declare(data_decl.name, self.names, "name"):
                data[data_decl.name.text] = self._data(data_decl)
        model_decls = [i for i in items if isinstance(i, ast.ModelDecl)]
        loss_decls = [i for i in items if isinstance(i, ast.LossDecl)]
        models_ok = [d for d in model_decls if self._declare(d.name, self.names, "name")]
        losses_ok = [d for d in loss_decls if self._declare(d.name, self.names, "name")]
        models: dict[str, ir.Model] = {}
        for model_decl in models_ok:
            model = self._model(model_decl, zeros, builder)
            if model is not None:
                models[model.name] = model
        lowering = LossLowering(data,
                                {d.name.text for d in models_ok}, {d.name.text for d in losses_ok}, self.diags)
        losses: dict[str, ir.Loss] = {}
        for loss_decl in losses_ok:
            expr = lowering.lower(loss_decl.expr)
            if expr is not None:
                losses[loss_decl.name.text] = ir.Loss(loss_decl.name.text, expr, loss_decl.span)
        trains = self._trains([i for i in items if isinstance(i, ast.TrainStmt)],
                              {d.name.text for d in models_ok}, {d.name.text for d in losses_ok})
        if settings is None:
            return None
        return ir.Pipeline(node.name.text, self.filename, settings,
                           {k: v for k, v in data.items() if v is not None}, zeros, models, losses,
                           tuple(trains), node.span, complete=not self.diags.has_errors)

    def _declare(self, name: ast.Name, table: dict[str, Span], kind: str) -> bool:
        if name.text in table:
            self.diags.add("DSG202", name.span, f"`{name.text}` is declared twice",
                           "rename one of the two declarations", Note("first declared here", table[name.text]))
            return False
        table[name.text] = name.span
        return True

    # -- settings ------------------------------------------------------------------------------

    def _settings(self, nodes: list[ast.Setting], pipeline: ast.Pipeline) -> ir.Settings | None:
        values: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        for node in nodes:
            key = node.name.text
            spec = catalogue.SETTINGS.get(key)
            if spec is None:
                self.diags.add("DSG207", node.name.span, f"`{key}` is not a pipeline setting"
                               f"{did_you_mean(key, catalogue.SETTINGS)}",
                               f"the settings are: {', '.join(catalogue.SETTINGS)}")
                continue
            if key in values:
                self.diags.add("DSG208", node.name.span, f"setting `{key}` is given twice",
                               "keep one of them", Note("first given here", spans[key]))
                continue
            value = to_python(node.value, self.diags)
            if value is INVALID or not check_type(spec.type, value, node.value.span, f"`{key}`", self.diags):
                values[key] = INVALID
                continue
            if key == "precision" and value not in catalogue.PRECISIONS:
                self.diags.add("DSG209", node.value.span, f"precision must be one of "
                               f"{', '.join(catalogue.PRECISIONS)}, not {describe(value)}", "write `precision = bf16`")
                values[key] = INVALID
                continue
            minimum = 0 if key in ("seed", "checkpoint_every") else 1
            if spec.type == "int" and value < minimum:
                self.diags.add("DSG209", node.value.span, f"`{key}` must be at least {minimum}, not {value}",
                               f"write a whole number of {minimum} or more")
                values[key] = INVALID
                continue
            values[key], spans[key] = value, node.span
        if "steps" in spans and "epochs" in spans:
            self.diags.add("DSG209", spans["epochs"], "`steps` and `epochs` are both given",
                           "give one: `steps` counts optimizer steps, `epochs` passes over the data",
                           Note("steps given here", spans["steps"]))
        for required, why in (("micro_batch", "`micro_batch = 8` (samples per process per step)"),):
            if required not in values:
                self.diags.add("DSG210", pipeline.name.span, f"pipeline `{pipeline.name.text}` has no `{required}`",
                               f"add {why}")
        if "steps" not in values and "epochs" not in values:
            self.diags.add("DSG210", pipeline.name.span, f"pipeline `{pipeline.name.text}` says neither "
                           "`steps` nor `epochs`", "add `steps = 100` or `epochs = 1`")
        if any(v is INVALID for v in values.values()) or "micro_batch" not in values \
                or ("steps" not in values and "epochs" not in values):
            return None
        def get(key: str) -> Any:
            return values.get(key, catalogue.SETTINGS[key].default)
        return ir.Settings(get("seed"), get("steps"), get("epochs"), get("micro_batch"), get("grad_accum"),
                           "grad_accum" in values, get("log_every"), get("checkpoint_every"),
                           Precision(get("precision")), spans)

    # -- sources -------------------------------------------------------------------------------

    def _source(self, node: ast.Source, table: dict[str, catalogue.Builtin], kind: str) -> Source | None:
        if node.factory is not None:
            args = self._free_args(node.args)
            return Source(SourceKind.FACTORY, node.factory, args, node.span) if args is not None else None
        path = [n.text for n in node.path]
        if path == ["hf"] and kind == "model":
            args = self._free_args(node.args)
            if args is None:
                return None
            if not args or not ((args[0][0] == "0" and isinstance(args[0][1], str))
                                or any(k == "config" for k, _ in args)):
                self.diags.add("DSG205", node.span, "`hf` needs a local directory or a config",
                               'write `hf("path/to/model")` or `hf(config="config.json")`')
                return None
            named = dict(args)
            if "task" in named and named["task"] not in catalogue.HF_TASKS:
                self.diags.add("DSG209", _keyword_span(node, "task"),
                               f"hf task must be one of {', '.join(catalogue.HF_TASKS)}, "
                               f"not {describe(named['task'])}", "leave `task` out to use the class the model's "
                               'config names (its "architectures"), or write e.g. `task="causal_lm"`')
                return None
            if isinstance(named.get("config"), dict) and "model_type" not in named["config"]:
                self.diags.add("DSG205", _keyword_span(node, "config"), "`hf(config={...})` needs a `model_type`",
                               'add e.g. `model_type = "gpt2"`: Transformers picks the config class from it')
                return None
            target = named.get("0", named.get("config"))
            return Source(SourceKind.HF, target if isinstance(target, str) else "config", args, node.span)
        if len(path) == 2 and path[0] == "builtin":
            spec = table.get(path[1])
            if spec is None:
                self.diags.add("DSG206", node.path[1].span, f"there is no built-in {kind} `{path[1]}`"
                               f"{did_you_mean(path[1], table)}", f"the built-in {kind}s are: {', '.join(table)}")
                return None
            bound = bind_args(spec, kind, node.args, node.span, self.diags)
            if bound is None:
                return None
            return Source(SourceKind.BUILTIN, spec.name, tuple(sorted(bound.items())), node.span)
        written = ".".join(path)
        self.diags.add("DSG213", node.span, f"`{written}(...)` is not a {kind} source",
                       f"write `builtin.NAME(...)`, `package.module:function(...)`"
                       f"{' or `hf(...)`' if kind == 'model' else ''}")
        return None

    def _free_args(self, args: tuple[ast.Arg[ast.Value], ...]) -> tuple[tuple[str, Any], ...] | None:
        out, ok = [], True
        for i, arg in enumerate(args):
            value = to_python(arg.value, self.diags)
            ok = ok and value is not INVALID
            out.append((arg.name.text if arg.name else str(i), value))
        return tuple(out) if ok else None

    def _data(self, decl: ast.DataDecl) -> ir.DataSet | None:
        source = self._source(decl.source, catalogue.DATA, "data set")
        if source is None:
            return None
        fields = None
        if source.kind is SourceKind.BUILTIN:
            spec = catalogue.DATA[source.target]
            fields = spec.fields if spec.fields is not None else (
                tuple(dict(source.args)["fields"]) if dict(source.args).get("fields") else None)
        return ir.DataSet(decl.name.text, source, fields, decl.span)

    # -- models --------------------------------------------------------------------------------

    def _model(self, decl: ast.ModelDecl, zeros: dict[str, ir.ZeroConfig], builder: ZeroBuilder) -> ir.Model | None:
        source = self._source(decl.source, catalogue.MODELS, "model")
        name = decl.name.text
        props: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        for entry in decl.block.entries if decl.block else ():
            key = entry.key.text
            if key not in catalogue.MODEL_PROPERTIES:
                self.diags.add("DSG207", entry.key.span, f"`{key}` is not a model property"
                               f"{did_you_mean(key, catalogue.MODEL_PROPERTIES)}",
                               f"a model block takes: {', '.join(catalogue.MODEL_PROPERTIES)}")
                continue
            if key in props:
                self.diags.add("DSG208", entry.key.span, f"`{key}` is given twice for model `{name}`",
                               "keep one of them", Note("first given here", spans[key]))
                continue
            spans[key] = entry.span
            props[key] = self._property(name, key, entry, zeros, builder)
        lora = props.get("lora")
        if source is not None and isinstance(lora, Lora) and lora.targets is None \
                and source.kind is not SourceKind.HF:
            call = next(e.value for e in decl.block.entries if e.key.text == "lora") if decl.block else None
            self.diags.add("DSG205", call.span if call else spans["lora"],
                           f"lora on `{name}` needs `targets`: PEFT knows default "
                           "targets only for Hugging Face architectures",
                           'name the layers to adapt, e.g. `lora(r=8, targets=["0", "2"])` for an '
                           "mlp's first two Linear layers")
            return None
        if source is None or INVALID in props.values():
            return None
        return ir.Model(name, source, props.get("zero"), bool(props.get("frozen", False)),
                        props.get("optimizer"), props.get("scheduler"), props.get("clip"),
                        props.get("precision"), decl.span, spans, props.get("lora"))

    def _property(self, model: str, key: str, entry: ast.Entry, zeros: dict[str, ir.ZeroConfig],
                  builder: ZeroBuilder) -> Any:
        value = entry.value
        if key == "frozen":
            if value is None:
                return True
            if isinstance(value, ast.Bool):
                return value.value
            self.diags.add("DSG203", value.span, "`frozen` is a flag", "write `frozen` (or `frozen = false`)")
            return INVALID
        if value is None:
            self.diags.add("DSG203", entry.span, f"`{key}` needs a value", f"write `{key} = ...`")
            return INVALID
        if key == "zero":
            return self._zero_ref(model, value, zeros, builder)
        if key in ("optimizer", "scheduler", "lora"):
            table = {"optimizer": catalogue.OPTIMIZERS, "scheduler": catalogue.SCHEDULERS,
                     "lora": catalogue.ADAPTERS}[key]
            if not isinstance(value, ast.CallValue):
                self.diags.add("DSG203", value.span, f"`{key}` is written as a call, e.g. "
                               f"`{key} = {next(iter(table))}(...)`", f"the {key}s are: {', '.join(table)}")
                return INVALID
            spec = table.get(value.name.text)
            if spec is None:
                self.diags.add("DSG206", value.name.span, f"there is no {key} `{value.name.text}`"
                               f"{did_you_mean(value.name.text, table)}", f"the {key}s are: {', '.join(table)}")
                return INVALID
            bound = bind_args(spec, key, value.args, value.span, self.diags)
            if bound is None:
                return INVALID
            if key == "lora":
                return self._lora(bound, value)
            cls = ir.Optimizer if key == "optimizer" else ir.Scheduler
            return cls(spec.name, bound, value.span)
        python = to_python(value, self.diags)
        if python is INVALID:
            return INVALID
        if key == "clip":
            if not check_type("float", python, value.span, "`clip`", self.diags):
                return INVALID
            if python <= 0:
                self.diags.add("DSG209", value.span, f"`clip` must be above 0, not {python}",
                               "write the maximum gradient norm, e.g. `clip = 1.0`, or remove `clip`")
                return INVALID
            return float(python)
        if python not in catalogue.PRECISIONS:  # key == "precision"
            self.diags.add("DSG209", value.span, f"precision must be one of {', '.join(catalogue.PRECISIONS)}, "
                           f"not {describe(python)}", "write `precision = bf16`")
            return INVALID
        return Precision(python)

    def _lora(self, bound: dict[str, Any], value: ast.CallValue) -> Any:
        args = {a.name.text if a.name else catalogue.ADAPTERS["lora"].params[i].name: a
                for i, a in enumerate(value.args)}
        for key, ok, words in (("r", bound["r"] >= 1, "at least 1"), ("alpha", bound["alpha"] > 0, "above 0")):
            if not ok:
                span = args[key].value.span if key in args else value.span
                self.diags.add("DSG209", span, f"lora `{key}` must be {words}, not {bound[key]}",
                               "the usual values are `r=8, alpha=16`")
                return INVALID
        if not 0.0 <= bound["dropout"] < 1.0:
            span = args["dropout"].value.span if "dropout" in args else value.span
            self.diags.add("DSG209", span, f"lora `dropout` must be in [0, 1), not {bound['dropout']}",
                           "write e.g. `dropout=0.05`")
            return INVALID
        if bound["targets"] is not None and not bound["targets"]:
            self.diags.add("DSG209", args["targets"].value.span, "lora `targets` is an empty list",
                           'name the modules to adapt, e.g. `targets=["c_attn"]`, or leave `targets` out '
                           "for PEFT's defaults of the architecture")
            return INVALID
        targets = tuple(bound["targets"]) if bound["targets"] is not None else None
        return Lora(bound["r"], float(bound["alpha"]), float(bound["dropout"]), targets, bound["merge"])

    def _zero_ref(self, model: str, value: ast.Value, zeros: dict[str, ir.ZeroConfig], builder: ZeroBuilder) -> Any:
        if isinstance(value, ast.Ident):
            if value.name in zeros:
                return value.name
            if value.name == ir.ZERO_AUTO and value.name not in self.zero_names:
                return ir.ZERO_AUTO         # the stage is chosen by dsgraph.zeroauto
            if value.name not in self.zero_names:
                self.diags.add("DSG201", value.span, f"there is no ZeRO config `{value.name}`"
                               f"{did_you_mean(value.name, zeros)}",
                               f"declare it: `zero {value.name} {{ stage = 2 }}`")
            return INVALID
        if isinstance(value, ast.Block):
            inline = f"{model}.zero"
            zeros[inline] = builder.build(inline, value.span, None, value)
            return inline
        self.diags.add("DSG203", value.span, "`zero` takes the name of a ZeRO config or a block",
                       "write `zero = z3` or `zero = { stage = 3 }`")
        return INVALID

    # -- train statements ----------------------------------------------------------------------

    def _trains(self, nodes: list[ast.TrainStmt], models: set[str], losses: set[str]) -> list[ir.Train]:
        trains = []
        for index, node in enumerate(nodes):
            ok = True
            for name in node.models:
                if name.text not in models:
                    ok = False
                    self._wrong_name(name, models, "model", "a model declared with `model`")
            if node.loss.text not in losses:
                ok = False
                self._wrong_name(node.loss, losses, "loss", "a loss declared with `loss`")
            if ok:
                trains.append(ir.Train(index, tuple(n.text for n in node.models),
                                       tuple(n.span for n in node.models), node.loss.text,
                                       node.loss.span, node.span))
        return trains

    def _wrong_name(self, name: ast.Name, candidates: set[str], kind: str, what: str) -> None:
        if name.text in self.names:
            self.diags.add("DSG212", name.span, f"`{name.text}` is not a {kind}", f"`train` takes {what} here")
        else:
            self.diags.add("DSG201", name.span, f"there is no {kind} `{name.text}`"
                           f"{did_you_mean(name.text, candidates)}", f"`train` takes {what} here")
