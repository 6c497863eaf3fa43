"""The registry of diagnostic codes. Every code has a corpus case in tests/errors/ and an
entry in docs/diagnostics.md (a test holds both). Codes are grouped by the stage that finds them:
1xx syntax, 2xx names and values, 3xx graph, 4xx DeepSpeed configuration, 5xx run time."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    slug: str
    severity: Severity
    summary: str


E, W = Severity.ERROR, Severity.WARNING

_ALL = (
    # 1xx: syntax. Only these stop compilation early.
    Code("DSG101", "unexpected-token", E, "a token that cannot stand here"),
    Code("DSG102", "unexpected-character", E, "a character that is not part of the language"),
    Code("DSG103", "unexpected-end", E, "the file ends inside a block or an expression"),
    Code("DSG104", "unterminated-string", E, "a string without its closing quote"),
    Code("DSG105", "input-too-large", E, "the file is too long or nested too deeply to compile"),
    Code("DSG106", "no-pipeline", E, "the file declares no pipeline, or more than one"),
    Code("DSG107", "include-failed", E, "an included file is missing, cyclic or declares a pipeline"),
    # 2xx: names and values.
    Code("DSG201", "undefined-name", E, "a name that is declared nowhere"),
    Code("DSG202", "duplicate-name", E, "a name declared twice"),
    Code("DSG203", "wrong-type", E, "a value of the wrong type"),
    Code("DSG204", "unknown-argument", E, "an argument the built-in does not take"),
    Code("DSG205", "missing-argument", E, "a required argument is missing"),
    Code(
        "DSG206", "unknown-builtin", E, "a built-in model, data set, loss, optimizer or scheduler that does not exist"
    ),
    Code("DSG207", "unknown-setting", E, "a setting or property that does not exist here"),
    Code("DSG208", "duplicate-setting", E, "a setting given twice"),
    Code("DSG209", "invalid-value", E, "a value outside what the setting accepts"),
    Code("DSG210", "missing-setting", E, "a required pipeline setting is missing"),
    Code("DSG211", "unknown-field", E, "a data field the data set does not have"),
    Code("DSG212", "wrong-kind", E, "a name used as something it is not"),
    Code(
        "DSG213",
        "bad-source",
        E,
        "a model, data or loss source that is not builtin.X, package.module:function or hf(...)",
    ),
    Code("DSG214", "missing-model-directory", W, "an hf(...) directory or config file that does not exist here"),
    # 3xx: the graph.
    Code("DSG301", "frozen-model-trained", E, "a frozen model listed in `train`"),
    Code("DSG302", "trained-model-unreached", E, "a trained model that its loss does not depend on"),
    Code("DSG303", "unused-model", W, "a model declared but used by no loss"),
    Code("DSG304", "unused-loss", W, "a loss that no `train` uses"),
    Code("DSG305", "loss-cycle", E, "losses that refer to each other in a cycle"),
    Code("DSG306", "model-trained-twice", E, "a model listed in two `train` statements"),
    Code("DSG307", "gradient-crosses-groups", E, "a model call whose gradients would reach two train groups"),
    Code("DSG308", "nothing-trained", E, "a pipeline without any `train` statement"),
    Code("DSG309", "implicitly-frozen", W, "a model used by a loss but neither trained nor marked `frozen`"),
    Code("DSG310", "unused-declaration", W, "a data set or ZeRO config declared but never used"),
    Code("DSG311", "loss-trained-twice", E, "one loss used by two `train` statements"),
    Code("DSG312", "eval-set-trained-on", E, "an eval set that the training losses also read"),
    Code("DSG313", "nothing-to-evaluate", E, "an eval set no trained loss reads through, or `eval_every` without one"),
    Code("DSG314", "loss-partly-evaluated", W, "a loss reading data sets with and without an eval set"),
    Code("DSG315", "cache-trained-model", E, "`cache` on a model that is trained or not declared frozen"),
    Code("DSG316", "cache-model-input", E, "a cached call whose argument is another model's output"),
    Code("DSG317", "cache-nondeterministic-data", E, "a cached call over data that may differ for the same index"),
    Code("DSG318", "cache-train-mode", E, "a cached model that runs in train mode (dropout differs each time)"),
    Code("DSG319", "cache-data-sets", E, "a cached call that reads no data set, or several"),
    Code("DSG320", "cache-on-policy", E, "a cached call that reads generated data (on-policy: new every step)"),
    Code("DSG321", "generator-not-causal-lm", E, "a generation from a model that is not a causal language model"),
    Code("DSG322", "group-needs-samples", E, "a group-relative loss over a generation of one sample per prompt"),
    Code("DSG323", "generation-too-long", E, "prompts plus new tokens longer than a model's positions"),
    Code("DSG324", "tokenizer-mismatch", E, "prompts tokenized for another vocabulary than the model's"),
    Code("DSG325", "generation-eval-set", E, "an eval set on the prompts of a generation"),
    Code("DSG326", "generation-prompts", E, "a generation over a data set without input_ids and attention_mask"),
    # 4xx: DeepSpeed configuration and engines.
    Code("DSG401", "frozen-with-optimizer", E, "a frozen model with an optimizer, scheduler, clipping or LoRA adapter"),
    Code("DSG402", "frozen-zero-no-sharding", W, "ZeRO-1/2 on a frozen model: only stage 3 shards parameters"),
    Code("DSG403", "shared-loss-zero0", E, "a shared-loss group with a ZeRO-0 model"),
    Code("DSG404", "shared-loss-fp16", E, "a shared-loss group with an fp16 model"),
    Code("DSG405", "grad-accum-disagreement", E, "gradient accumulation steps that disagree"),
    Code("DSG406", "batch-arithmetic", E, "batch sizes that cannot hold together"),
    Code("DSG407", "offload-param-needs-stage3", E, "`offload_param` without ZeRO stage 3"),
    Code("DSG408", "unknown-deepspeed-key", E, "a DeepSpeed configuration key that DeepSpeed does not know"),
    Code("DSG409", "missing-config-file", E, "a DeepSpeed JSON file that does not exist"),
    Code("DSG410", "invalid-config-file", E, "a DeepSpeed JSON file that is not valid JSON or not an object"),
    Code("DSG411", "wrong-deepspeed-type", E, "a DeepSpeed key with a value of the wrong type"),
    Code("DSG412", "unresolvable-auto", E, 'an "auto" value that nothing in the pipeline can fill'),
    Code("DSG413", "no-optimizer", E, "a trained model without an optimizer"),
    Code("DSG414", "conflicting-precision", E, "a model asked to be fp16 and bf16 at once"),
    Code("DSG415", "zero-auto-nothing-fits", E, "`zero = auto`: no stage fits, not even ZeRO-3 with offload"),
    Code("DSG416", "zero-auto-unsized", E, "`zero = auto`: a model could not be built on the meta device to size it"),
    Code("DSG417", "zero-auto-no-world-size", W, "`zero = auto` planned without a world size (for 1 process)"),
    Code(
        "DSG418",
        "zero-auto-deferred",
        W,
        "`zero = auto` chosen only when the run starts: a model is built by user code",
    ),
    Code("DSG419", "engine-cannot-do-job", E, "`engine = ...` asks for an engine that cannot run this model"),
    Code("DSG420", "offload-optimizer-without-zero", E, "optimizer offload at stage 0, or a partial offload below 3"),
    Code("DSG421", "quantized-without-lora", E, "a trained model with 4-bit weights and no LoRA adapter to train"),
    # 5xx: run time (`dsgraph run`), checked by the driver before any worker starts.
    Code("DSG501", "checkpoint-mismatch", E, "a checkpoint saved by a different plan or world size"),
    Code("DSG502", "no-complete-checkpoint", E, "a run directory without a complete dsgraph checkpoint"),
)

REGISTRY: dict[str, Code] = {c.code: c for c in _ALL}


def lookup(code: str) -> Code:
    return REGISTRY[code]
