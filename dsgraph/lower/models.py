"""Model declarations to `ir.Model`: the source, the ZeRO config it names or writes inline, the
optimizer, scheduler, clipping, precision, LoRA and quantization properties (DSG201-DSG209)."""

from __future__ import annotations

from typing import Any

from dsgraph import catalogue, ir
from dsgraph.diagnostics import Diagnostics, did_you_mean
from dsgraph.dsconfig.zero import ZeroBuilder
from dsgraph.lower.sources import check_hf_paths, lower_source
from dsgraph.lower.values import INVALID, bind_args, block_entries, check_type, describe, to_python
from dsgraph.plan import Engine, Lora, Precision, Quantize, Source, SourceKind
from dsgraph.source import Span
from dsgraph.syntax import ast


class ModelLowering:
    def __init__(self, diags: Diagnostics, zero_names: dict[str, Span], builder: ZeroBuilder, includes_loaded: bool):
        self.diags = diags
        self.zero_names = zero_names  # every declared ZeRO config, those with errors too
        self.includes_loaded = includes_loaded  # False: a name may be declared in an include that failed
        self.builder = builder  # inline `zero = { ... }` blocks

    def model(self, decl: ast.ModelDecl, zeros: dict[str, ir.ZeroConfig]) -> ir.Model | None:
        source = lower_source(decl.source, catalogue.MODELS, "model", self.diags)
        name = decl.name.text
        props: dict[str, Any] = {}
        spans: dict[str, Span] = {}
        for entry in block_entries(decl.block, catalogue.MODEL_PROPERTIES, "model", f"model `{name}`", self.diags):
            key = entry.key.text
            spans[key] = entry.span
            props[key] = self._property(name, key, entry, zeros)
        lora = props.get("lora")
        if source is not None and isinstance(lora, Lora) and lora.targets is None and source.kind is not SourceKind.HF:
            call = next(e.value for e in decl.block.entries if e.key.text == "lora") if decl.block else None
            self.diags.add(
                "DSG205",
                call.span if call else spans["lora"],
                f"lora on `{name}` needs `targets`: PEFT knows default targets only for Hugging Face architectures",
                'name the layers to adapt, e.g. `lora(r=8, targets=["0", "2"])` for an mlp\'s first two Linear layers',
            )
            return None
        if source is not None and props.get("gradient_checkpointing") is True and source.kind is not SourceKind.HF:
            self.diags.add(
                "DSG209",
                spans["gradient_checkpointing"],
                f"`gradient_checkpointing` needs a Hugging Face model (`hf(...)`); `{name}` is not one",
                "remove it, or wrap the layers in torch.utils.checkpoint in your factory",
            )
            return None
        if (
            source is not None
            and isinstance(props.get("quantize"), Quantize)
            and not self._quantizable(name, source, decl, spans, lora)
        ):
            return None
        if props.get("train_mode") is True and not props.get("frozen", False):
            self.diags.add(
                "DSG209",
                spans["train_mode"],
                f"`train_mode` is for frozen models; `{name}` is not frozen",
                "remove it: a trained model runs in train mode already (eval mode only in evaluations)",
            )
            return None
        if source is None or INVALID in props.values():
            return None
        dsg = self.builder.sources.get(decl.name.span.file)  # the file that declares the model
        if source.kind is SourceKind.HF and dsg is not None:
            check_hf_paths(decl.source, source, dsg, self.diags)
        return ir.Model(
            name,
            source,
            props.get("zero"),
            bool(props.get("frozen", False)),
            props.get("optimizer"),
            props.get("scheduler"),
            props.get("clip"),
            props.get("precision"),
            decl.span,
            spans,
            props.get("lora"),
            props.get("engine"),
            bool(props.get("zero_init", True)),
            bool(props.get("gradient_checkpointing", False)),
            props.get("quantize"),
            props.get("cache", "false"),
            bool(props.get("train_mode", False)),
        )

    def _quantizable(
        self, name: str, source: Source, decl: ast.ModelDecl, spans: dict[str, Span], lora: Lora | None
    ) -> bool:
        """4-bit weights are loaded by Transformers' from_pretrained, from a model directory
        (DSG209 otherwise); an adapter cannot be merged into packed weights (DSG209)."""
        if source.kind is not SourceKind.HF:
            self.diags.add(
                "DSG209",
                spans["quantize"],
                f'`quantize` needs a Hugging Face model (`hf("dir")`); `{name}` is not one',
                "remove `quantize`: Transformers' from_pretrained loads the 4-bit weights (bitsandbytes)",
            )
            return False
        if source.arg("config") is not None:
            self.diags.add(
                "DSG209",
                spans["quantize"],
                f"`quantize` needs a model directory to load the weights from; `{name}` is built from a config",
                'write `hf("dir")` with the model\'s directory, or remove `quantize`',
            )
            return False
        if lora is not None and lora.merge:
            call = next((e.value for e in decl.block.entries if e.key.text == "lora"), None) if decl.block else None
            args = call.args if isinstance(call, ast.CallValue) else ()
            merge = next((a for a in args if a.name is not None and a.name.text == "merge"), None)
            self.diags.add(
                "DSG209",
                merge.span if merge is not None else spans["lora"],
                f"`lora(merge=true)` on `{name}` cannot merge the adapter into its 4-bit weights",
                "drop `merge=true`; merge the exported adapter into the full-precision model "
                "(PEFT: `PeftModel.from_pretrained(base, dir).merge_and_unload()`)",
            )
            return False
        return True

    def _property(self, model: str, key: str, entry: ast.Entry, zeros: dict[str, ir.ZeroConfig]) -> Any:
        value = entry.value
        if key == "cache":  # `cache`, `cache = true | false | auto`
            if value is None:
                return "true"
            if isinstance(value, ast.Bool):
                return "true" if value.value else "false"
            if isinstance(value, ast.Ident) and value.name in catalogue.CACHE_MODES:
                return value.name
            self.diags.add(
                "DSG203",
                value.span,
                "`cache` is true, false or auto",
                "write `cache = true` (computed once before the loop), `cache = auto` (when it pays) "
                "or `cache = false`",
            )
            return INVALID
        if key in ("frozen", "zero_init", "gradient_checkpointing", "train_mode"):
            if value is None:
                return True
            if isinstance(value, ast.Bool):
                return value.value
            self.diags.add("DSG203", value.span, f"`{key}` is a flag", f"write `{key}` (or `{key} = false`)")
            return INVALID
        if value is None:
            self.diags.add("DSG203", entry.span, f"`{key}` needs a value", f"write `{key} = ...`")
            return INVALID
        if key == "zero":
            return self._zero_ref(model, value, zeros)
        if key == "optimizer" and isinstance(value, ast.FactoryValue):
            return self._client_optimizer(value)
        if key in ("optimizer", "scheduler", "lora", "quantize"):
            table = {
                "optimizer": catalogue.OPTIMIZERS,
                "scheduler": catalogue.SCHEDULERS,
                "lora": catalogue.ADAPTERS,
                "quantize": catalogue.QUANTIZERS,
            }[key]
            if not isinstance(value, ast.CallValue):
                self.diags.add(
                    "DSG203",
                    value.span,
                    f"`{key}` is written as a call, e.g. `{key} = {next(iter(table))}(...)`",
                    f"the {key}s are: {', '.join(table)}",
                )
                return INVALID
            spec = table.get(value.name.text)
            if spec is None:
                self.diags.add(
                    "DSG206",
                    value.name.span,
                    f"there is no {key} `{value.name.text}`{did_you_mean(value.name.text, table)}",
                    f"the {key}s are: {', '.join(table)}",
                )
                return INVALID
            bound = bind_args(spec, key, value.args, value.span, self.diags)
            if bound is None:
                return INVALID
            if key == "lora":
                return self._lora(bound, value)
            if key == "quantize":
                return self._quantize(bound, value)
            cls = ir.Optimizer if key == "optimizer" else ir.Scheduler
            return cls(spec.name, bound, value.span)
        python = to_python(value, self.diags)
        if python is INVALID:
            return INVALID
        if key == "clip":
            if not check_type("float", python, value.span, "`clip`", self.diags):
                return INVALID
            if python <= 0:
                self.diags.add(
                    "DSG209",
                    value.span,
                    f"`clip` must be above 0, not {python}",
                    "write the maximum gradient norm, e.g. `clip = 1.0`, or remove `clip`",
                )
                return INVALID
            return float(python)
        if key == "engine":
            if python not in catalogue.ENGINES:
                self.diags.add(
                    "DSG209",
                    value.span,
                    f"engine must be one of {', '.join(catalogue.ENGINES)}, not {describe(python)}",
                    "write `engine = native` (deepspeed.initialize) or `engine = accelerate` (Accelerate's prepare)",
                )
                return INVALID
            return Engine.DEEPSPEED if python == "native" else Engine.ACCELERATE
        if python not in catalogue.PRECISIONS:  # key == "precision"
            self.diags.add(
                "DSG209",
                value.span,
                f"precision must be one of {', '.join(catalogue.PRECISIONS)}, not {describe(python)}",
                "write `precision = bf16`",
            )
            return INVALID
        return Precision(python)

    def _client_optimizer(self, value: ast.FactoryValue) -> Any:
        """`optimizer = my.pkg:make(lr=1e-3)`: called at run time with the model's trainable
        parameters first, then these keyword arguments; DeepSpeed gets it as a client optimizer."""
        params: dict[str, Any] = {}
        for arg in value.args:
            if arg.name is None:
                self.diags.add(
                    "DSG203",
                    arg.span,
                    "a client optimizer's arguments are named: the parameters come first, from dsgraph",
                    f"write `{value.target}(lr=1e-3)`",
                )
                return INVALID
            python = to_python(arg.value, self.diags)
            if python is INVALID:
                return INVALID
            params[arg.name.text] = python
        return ir.Optimizer("factory", params, value.span, value.target)

    def _lora(self, bound: dict[str, Any], value: ast.CallValue) -> Any:
        args = {
            a.name.text if a.name else catalogue.ADAPTERS["lora"].params[i].name: a for i, a in enumerate(value.args)
        }
        for key, ok, words in (("r", bound["r"] >= 1, "at least 1"), ("alpha", bound["alpha"] > 0, "above 0")):
            if not ok:
                span = args[key].value.span if key in args else value.span
                self.diags.add(
                    "DSG209",
                    span,
                    f"lora `{key}` must be {words}, not {bound[key]}",
                    "the usual values are `r=8, alpha=16`",
                )
                return INVALID
        if not 0.0 <= bound["dropout"] < 1.0:
            span = args["dropout"].value.span if "dropout" in args else value.span
            self.diags.add(
                "DSG209", span, f"lora `dropout` must be in [0, 1), not {bound['dropout']}", "write e.g. `dropout=0.05`"
            )
            return INVALID
        if bound["targets"] is not None and not bound["targets"]:
            self.diags.add(
                "DSG209",
                args["targets"].value.span,
                "lora `targets` is an empty list",
                'name the modules to adapt, e.g. `targets=["c_attn"]`, or leave `targets` out '
                "for PEFT's defaults of the architecture",
            )
            return INVALID
        targets = tuple(bound["targets"]) if bound["targets"] is not None else None
        return Lora(bound["r"], float(bound["alpha"]), float(bound["dropout"]), targets, bound["merge"])

    def _quantize(self, bound: dict[str, Any], value: ast.CallValue) -> Any:
        if bound["type"] not in catalogue.QUANT_TYPES:
            arg = next((a for a in value.args if (a.name.text if a.name else "type") == "type"), None)
            self.diags.add(
                "DSG209",
                arg.value.span if arg is not None else value.span,
                f"bnb4 `type` must be one of {', '.join(catalogue.QUANT_TYPES)}, not {describe(bound['type'])}",
                'write `bnb4(type="nf4")` (NormalFloat4, as QLoRA) or `bnb4(type="fp4")`',
            )
            return INVALID
        return Quantize(bound["type"], bound["double_quant"])

    def _zero_ref(self, model: str, value: ast.Value, zeros: dict[str, ir.ZeroConfig]) -> Any:
        if isinstance(value, ast.Ident):
            if value.name in zeros:
                return value.name
            if value.name == ir.ZERO_AUTO and value.name not in self.zero_names:
                return ir.ZERO_AUTO  # the stage is chosen by dsgraph.zeroauto
            if value.name not in self.zero_names and self.includes_loaded:
                self.diags.add(
                    "DSG201",
                    value.span,
                    f"there is no ZeRO config `{value.name}`{did_you_mean(value.name, zeros)}",
                    f"declare it: `zero {value.name} {{ stage = 2 }}`",
                )
            return INVALID
        if isinstance(value, ast.Block):
            inline = f"{model}.zero"
            zeros[inline] = self.builder.build(inline, value.span, None, value)
            return inline
        self.diags.add(
            "DSG203",
            value.span,
            "`zero` takes the name of a ZeRO config or a block",
            "write `zero = z3` or `zero = { stage = 3 }`",
        )
        return INVALID
