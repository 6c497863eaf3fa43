"""AST -> IR: one pipeline, names resolved, settings typed, defaults filled (DSG106, DSG2xx)."""

from __future__ import annotations


from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, Note, did_you_mean
from dsgraph.dsconfig.zero import ZeroBuilder
from dsgraph.load import Loaded, SharedZero
from dsgraph.lower.losses import LossLowering
from dsgraph.lower.models import ModelLowering
from dsgraph.lower.settings import lower_settings
from dsgraph.lower.sources import lower_source
from dsgraph.plan import DataSet, SourceKind
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
        loss_decls = [i for i in items if isinstance(i, ast.LossDecl)]
        models_ok = [d for d in model_decls if self._declare(d.name, self.names, "name")]
        losses_ok = [d for d in loss_decls if self._declare(d.name, self.names, "name")]
        models: dict[str, ir.Model] = {}
        model_lowering = ModelLowering(self.diags, self.zero_names, builder, includes_loaded)
        for model_decl in models_ok:
            model = model_lowering.model(model_decl, zeros)
            if model is not None:
                models[model.name] = model
        lowering = LossLowering(data, {d.name.text for d in models_ok}, {d.name.text for d in losses_ok}, self.diags)
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
        if source is None:
            return None
        fields = None
        if source.kind is SourceKind.BUILTIN:
            spec = catalogue.DATA[source.target]
            fields = (
                spec.fields
                if spec.fields is not None
                else (tuple(dict(source.args)["fields"]) if dict(source.args).get("fields") else None)
            )
        return DataSet(decl.name.text, source, fields, decl.span)

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

    def _wrong_name(self, name: ast.Name, candidates: set[str], kind: str, what: str) -> None:
        if name.text in self.names:
            self.diags.add("DSG212", name.span, f"`{name.text}` is not a {kind}", f"`train` takes {what} here")
        else:
            self.diags.add(
                "DSG201",
                name.span,
                f"there is no {kind} `{name.text}`{did_you_mean(name.text, candidates)}",
                f"`train` takes {what} here",
            )
