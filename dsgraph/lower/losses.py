"""Loss expressions: AST -> IR, resolving each name to a model call, a built-in or factory loss,
a data field or another loss."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, did_you_mean
from dsgraph.plan import DataSet
from dsgraph.source import Span
from dsgraph.syntax import ast

Positional: TypeAlias = tuple[ir.LossExpr, ...]
Keywords: TypeAlias = tuple[tuple[str, ir.LossExpr], ...]


class LossLowering:
    def __init__(
        self,
        data: dict[str, DataSet | None],
        model_names: set[str],
        loss_names: set[str],
        diags: Diagnostics,
        generations: set[str] | None = None,
        rewards: set[str] | None = None,
    ):
        self.data = data  # None: declared, but its declaration had errors
        self.models = model_names
        self.losses = loss_names
        self.diags = diags
        self.generations = generations or set()
        self.rewards = rewards or set()

    @property
    def _names(self) -> set[str]:
        return self.losses | set(self.data) | self.models | self.generations | self.rewards

    def lower(self, expr: ast.Expr) -> ir.LossExpr | None:
        match expr:
            case ast.Number(value=v, span=s):
                return ir.Const(v, s)
            case ast.String(value=v, span=s):
                return ir.Const(v, s)
            case ast.Ref(name=name, span=s):
                return self._ref(name, s)
            case ast.Attr(obj=obj, name=name, span=s):
                return self._attr(obj, name, s)
            case ast.Call(callee=callee, args=args, span=s):
                return self._call(callee, args, s)
            case ast.FactoryRef(target=t, span=s):
                self.diags.add(
                    "DSG212", s, f"factory `{t}` must be called", f"write `{t}(...)` with the tensors it takes"
                )
                return None
            case ast.BinOp(op=op, left=l, right=r, span=s):
                left, right = self.lower(l), self.lower(r)
                return ir.BinOp(op, left, right, s) if left is not None and right is not None else None
            case ast.Neg(operand=o, span=s):
                operand = self.lower(o)
                if isinstance(operand, ir.Const) and isinstance(operand.value, (int, float)):
                    return ir.Const(-operand.value, s)  # `-1` is a constant, not an expression
                return ir.Neg(operand, s) if operand is not None else None
        raise TypeError(f"not an expression: {expr!r}")

    def _ref(self, name: ast.Name, span: Span) -> ir.LossExpr | None:
        text = name.text
        if text in ("true", "false") and text not in self._names:
            return ir.Const(text == "true", span)  # `shift=true`
        if text in self.losses:
            return ir.LossRef(text, span)
        if text in self.generations:  # the rollouts themselves: what on-policy losses take
            return ir.Generated(text, None, span)
        if text in self.rewards:
            self.diags.add(
                "DSG212",
                span,
                f"reward `{text}` is used without being called",
                f"call it on a generation: `{text}(rollouts)`",
            )
            return None
        if text in self.data:
            data = self.data[text]
            fields = data.fields if data is not None else None
            example = f"{text}.{fields[0]}" if fields else f"{text}.FIELD"
            self.diags.add("DSG212", span, f"data set `{text}` is used without a field", f"name the field: `{example}`")
        elif text in self.models:
            self.diags.add(
                "DSG212",
                span,
                f"model `{text}` is used without being called",
                f"call it on its inputs: `{text}(data.field)`",
            )
        else:
            self._undefined(text, span, self._names)
        return None

    def _attr(self, obj: ast.Expr, name: ast.Name, span: Span) -> ir.LossExpr | None:
        if isinstance(obj, ast.Ref) and obj.name.text in self.generations:
            if name.text not in catalogue.GENERATION_FIELDS:
                self.diags.add(
                    "DSG211",
                    name.span,
                    f"generation `{obj.name.text}` has no field "
                    f"`{name.text}`{did_you_mean(name.text, catalogue.GENERATION_FIELDS)}",
                    f"its fields are: {', '.join(catalogue.GENERATION_FIELDS)}",
                )
                return None
            return ir.Generated(obj.name.text, name.text, span)
        if isinstance(obj, ast.Ref) and obj.name.text in self.data:
            data = self.data[obj.name.text]
            if data is None:  # already reported where it is declared
                return None
            if data.fields is not None and name.text not in data.fields:
                self.diags.add(
                    "DSG211",
                    name.span,
                    f"data set `{data.name}` has no field `{name.text}`{did_you_mean(name.text, data.fields)}",
                    f"its fields are: {', '.join(data.fields)}",
                )
                return None
            return ir.FieldRef(data.name, name.text, span)
        inner = self.lower(obj)
        if inner is None:
            return None
        if not isinstance(inner, (ir.ModelCall, ir.Project)):
            self.diags.add(
                "DSG212",
                name.span,
                f"`.{name.text}` can only follow a model call or a data set",
                "write `model(input).field` or `data.field`",
            )
            return None
        return ir.Project(inner, name.text, span)

    def _call(self, callee: ast.Expr, args: tuple[ast.Arg[ast.Expr], ...], span: Span) -> ir.LossExpr | None:
        lowered = self._args(args)
        if lowered is None:
            return None
        positional, keywords = lowered
        match callee:
            case ast.FactoryRef(target=t):
                return ir.LossFn(t, False, positional, keywords, span)
            case ast.Ref(name=name) if name.text in self.models:
                whole = [a for a in (*positional, *(v for _, v in keywords)) if _whole_generation(a)]
                if whole:
                    self.diags.add(
                        "DSG212",
                        whole[0].span,
                        "a model is called on a generation's fields, not on the generation",
                        f"write e.g. `{name.text}({ir.show_expr(whole[0])}.input_ids, "
                        f"attention_mask={ir.show_expr(whole[0])}.attention_mask)`",
                    )
                    return None
                return ir.ModelCall(name.text, positional, keywords, span)
            case ast.Ref(name=name) if name.text in self.rewards:
                if len(positional) != 1 or keywords or not _whole_generation(positional[0]):
                    self.diags.add(
                        "DSG212",
                        span,
                        f"reward `{name.text}` is called on one generation, by its name",
                        f"write `{name.text}(rollouts)` for `generate rollouts = ...`; "
                        "its options go where it is declared",
                    )
                    return None
                generated = positional[0]
                assert isinstance(generated, ir.Generated)
                return ir.RewardCall(name.text, generated.generation, span)
            case ast.Ref(name=name) if name.text in catalogue.LOSSES:
                return self._builtin_loss(catalogue.LOSSES[name.text], positional, keywords, span, args)
            case ast.Ref(name=name) if name.text in self.data or name.text in self.losses | self.generations:
                kind = "data set" if name.text in self.data else "loss" if name.text in self.losses else "generation"
                self.diags.add(
                    "DSG212",
                    name.span,
                    f"{kind} `{name.text}` cannot be called",
                    "only models, rewards, built-in losses and `package.module:function` factories are called",
                )
            case ast.Ref(name=name):
                self._undefined(name.text, name.span, self.models | self.rewards | set(catalogue.LOSSES))
            case _:
                self.diags.add(
                    "DSG212",
                    callee.span,
                    "only models, built-in losses and factories can be called",
                    "call a model by name (`student(x)`), a built-in loss (`ce(...)`), or `pkg.mod:fn(...)`",
                )
        return None

    def _args(self, args: tuple[ast.Arg[ast.Expr], ...]) -> tuple[Positional, Keywords] | None:
        positional: list[ir.LossExpr] = []
        keywords: list[tuple[str, ir.LossExpr]] = []
        ok = True
        for arg in args:
            value = self.lower(arg.value)
            if value is None:
                ok = False
            elif arg.name is None:
                positional.append(value)
            else:
                keywords.append((arg.name.text, value))
        return (tuple(positional), tuple(keywords)) if ok else None

    def _builtin_loss(
        self,
        spec: catalogue.Builtin,
        positional: Positional,
        keywords: Keywords,
        span: Span,
        args: tuple[ast.Arg[ast.Expr], ...],
    ) -> ir.LossExpr | None:
        tensors = [
            p for p in spec.params if p.type in ("tensor", "generation", "tokens") and p.default is catalogue.REQUIRED
        ]
        options = {p.name: p for p in spec.params if p not in tensors}
        ok = True
        if len(positional) != len(tensors):
            self.diags.add(
                "DSG205" if len(positional) < len(tensors) else "DSG204",
                span,
                f"loss `{spec.name}` takes {len(tensors)} tensor argument(s) "
                f"({', '.join(p.name for p in tensors)}), not {len(positional)}",
                f"write `{spec.name}({', '.join(p.name for p in tensors)}"
                f"{', ' if options else ''}{', '.join(f'{o}=...' for o in options)})`",
            )
            ok = False
        for tensor, value in zip(tensors, positional, strict=False):
            if tensor.type == "generation" and not _whole_generation(value):
                self.diags.add(
                    "DSG212",
                    value.span,
                    f"`{tensor.name}` of `{spec.name}` is a generation, by its name",
                    f"write the name of a `generate` declaration, e.g. `{spec.name}(..., rollouts, ...)`",
                )
                ok = False
            elif tensor.type == "tensor" and _whole_generation(value):
                self.diags.add(
                    "DSG212",
                    value.span,
                    f"`{tensor.name}` of `{spec.name}` is a tensor, not a generation",
                    "name one of its fields, e.g. `rollouts.completion_mask`",
                )
                ok = False
        named = [(a, a.name) for a in args if a.name is not None]
        for (name, value), (arg, arg_name) in zip(keywords, named, strict=True):
            param = options.get(name)
            if param is None:
                self.diags.add(
                    "DSG204",
                    arg_name.span,
                    f"loss `{spec.name}` has no option `{name}`{did_you_mean(name, options)}",
                    f"its options are: {', '.join(options) or 'none'}",
                )
                ok = False
            elif param.type == "tensor":
                pass  # an optional tensor (`mask=train.attention_mask`): any expression
            elif not isinstance(value, ir.Const) or not catalogue.type_matches(param.type, value.value):
                self.diags.add(
                    "DSG203",
                    arg.value.span,
                    f"option `{name}` of `{spec.name}` must be {catalogue.TYPE_WORDS[param.type]}",
                    f"write a constant, e.g. `{name}={param.default!r}`",
                )
                ok = False
            elif name == "topk" and isinstance(value.value, int) and value.value < 1:
                self.diags.add(
                    "DSG209",
                    arg.value.span,
                    f"`topk` keeps the teacher's K most likely classes: at least 1, not {value.value}",
                    "write e.g. `topk=64`, or leave it out for the whole distribution",
                )
                ok = False
        return ir.LossFn(spec.name, True, positional, keywords, span) if ok else None

    def _undefined(self, text: str, span: Span, candidates: Iterable[str]) -> None:
        self.diags.add(
            "DSG201",
            span,
            f"`{text}` is not defined{did_you_mean(text, candidates)}",
            f"declare it with `model`, `data`, `generate`, `reward` or `loss`, or use a built-in loss "
            f"({', '.join(catalogue.LOSSES)})",
        )


def _whole_generation(expr: ir.LossExpr) -> bool:
    return isinstance(expr, ir.Generated) and expr.field is None
