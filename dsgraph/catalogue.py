"""What the compiler knows of the built-ins: their arguments and, for data sets, their fields.

The runtime implements each of them (dsgraph/runtime/builtins.py); a test holds the two lists
equal. Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    name: str
    # int, float, str, bool, ints (a list of ints), floats, strs, any, tensor; generation (a
    # `generate` by its bare name); tokens (either that or a tensor of labels)
    type: str
    default: Any = REQUIRED


@dataclass(frozen=True)
class Builtin:
    name: str
    params: tuple[Param, ...]
    fields: tuple[str, ...] | None = None  # data sets only
    summary: str = ""
    stats: tuple[str, ...] = ()  # losses only: what the run logs beside the loss

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


P = Param

MODELS = {
    b.name: b
    for b in (
        Builtin(
            "mlp",
            (
                P("inputs", "int"),
                P("outputs", "int"),
                P("hidden", "ints", []),
                P("dropout", "float", 0.0),
                P("activation", "str", "gelu"),
            ),
            summary="a multi-layer perceptron",
        ),
        Builtin(
            "causal_lm",
            (
                P("vocab", "int", 256),
                P("dim", "int", 64),
                P("layers", "int", 2),
                P("heads", "int", 4),
                P("max_len", "int", 128),
                P("dropout", "float", 0.0),
            ),
            summary="a small causal transformer language model",
        ),
    )
}

DATA = {
    b.name: b
    for b in (
        Builtin(
            "synthetic_classification",
            (P("samples", "int"), P("features", "int"), P("classes", "int"), P("seed", "int", 0)),
            fields=("x", "y"),
            summary="Gaussian clusters, one per class",
        ),
        Builtin(
            "synthetic_tokens",
            (P("samples", "int"), P("length", "int"), P("vocab", "int", 256), P("seed", "int", 0)),
            fields=("input_ids", "attention_mask", "labels"),
            summary="random token sequences",
        ),
        Builtin(
            "jsonl", (P("path", "str"), P("fields", "strs", None)), fields=None, summary="one JSON object per line"
        ),
        Builtin(
            "prompt_completion",
            (P("path", "str"), P("tokenizer", "str", "bytes"), P("max_length", "int", 128)),
            fields=("input_ids", "attention_mask", "labels"),
            summary="JSONL {prompt, completion}, tokenized and padded; labels only on the completion",
        ),
        Builtin(
            "prompts",
            (P("path", "str"), P("tokenizer", "str", "bytes"), P("max_length", "int", 64)),
            fields=("input_ids", "attention_mask"),
            summary="JSONL {prompt, ...}: the prompts a generation completes, tokenized and left-padded",
        ),
        Builtin(
            "preference_pairs",
            (P("path", "str"), P("tokenizer", "str", "bytes"), P("max_length", "int", 128)),
            fields=(
                "chosen_input_ids",
                "chosen_attention_mask",
                "chosen_labels",
                "rejected_input_ids",
                "rejected_attention_mask",
                "rejected_labels",
            ),
            summary="JSONL {prompt, chosen, rejected}, each answer tokenized after the prompt",
        ),
        Builtin(
            "hf_dataset",
            (
                P("path", "str"),
                P("split", "str", "train"),
                P("format", "str", "prompt_completion"),  # prompt_completion, preference, chat, raw
                P("columns", "any", None),  # a block {field = "column"}: which column each field reads
                P("tokenizer", "str", "bytes"),
                P("max_length", "int", 128),
            ),
            fields=None,  # they follow `format`: lower/pipeline.py
            summary="a Hugging Face `datasets` data set (save_to_disk, parquet, JSON, CSV), tokenized by format",
        ),
    )
}

# The byte-level tokenizer `tokenizer = "bytes"` names (dsgraph/runtime/tokenizer.py): one id per
# byte, then padding, start and end of text.
BYTE_VOCAB = 259

# A "tensor" parameter without a default is a positional argument; one with the default None is an
# optional keyword (`mask=train.attention_mask`); the others are constant options.
LOSSES = {
    b.name: b
    for b in (
        Builtin(
            "ce",
            (
                P("logits", "tensor"),
                P("target", "tensor"),
                P("ignore_index", "int", -100),
                P("label_smoothing", "float", 0.0),
                P("shift", "bool", False),
            ),
            summary="cross-entropy; shift=true predicts the next token (causal LMs)",
        ),
        Builtin(
            "kl",
            (
                P("student", "tensor"),
                P("teacher", "tensor"),
                P("temperature", "float", 1.0),
                P("mask", "tensor", None),
                P("topk", "int", None),  # over the teacher's K most likely classes, the rest as one
            ),
            summary="KL(teacher || student) of softened distributions, scaled by T^2, over the mask's tokens",
        ),
        Builtin("mse", (P("input", "tensor"), P("target", "tensor")), summary="mean squared error"),
        Builtin("cosine", (P("input", "tensor"), P("target", "tensor")), summary="1 - cosine similarity, averaged"),
        Builtin(
            "dpo",
            (
                P("policy_chosen", "tensor"),
                P("policy_rejected", "tensor"),
                P("reference_chosen", "tensor"),
                P("reference_rejected", "tensor"),
                P("chosen_labels", "tensor"),
                P("rejected_labels", "tensor"),
                P("beta", "float", 0.1),
            ),
            summary="DPO over the sequence log-probabilities of the labelled tokens (logits in, labels -100 elsewhere)",
            stats=("reward_margin", "reward_accuracy"),
        ),
        Builtin(
            "grpo",
            (
                P("policy", "tensor"),
                P("rollouts", "generation"),
                P("rewards", "tensor"),
                P("reference", "tensor", None),
                P("beta", "float", 0.04),
                P("epsilon", "float", 0.2),
            ),
            summary="GRPO: group-normalised advantages, the clipped ratio to the generation's "
            "log-probabilities, beta * k3 KL to the reference (logits in)",
            stats=("reward_mean", "reward_std", "kl", "clip_fraction", "completion_length"),
        ),
        Builtin(
            "gkd",
            (
                P("student", "tensor"),
                P("teacher", "tensor"),
                P("tokens", "tokens"),
                P("beta", "float", 0.5),
                P("temperature", "float", 1.0),
            ),
            summary="GKD's generalised JSD per token (beta 0: KL(teacher||student), 1: reverse KL) over a "
            "generation's completions, or the labelled tokens (labels != -100)",
        ),
    )
}

# `reward NAME = builtin.X(...)`: one number per completion of a generation.
REWARDS = {
    b.name: b
    for b in (
        Builtin(
            "sums",
            (P("exact", "float", 1.0), P("digits", "float", 0.5)),
            summary="the toy task's reward: `exact` for the right sum of an `a+b=` prompt, else `digits` "
            "times the share of digits in the completion",
        ),
    )
}

# `generate NAME = MODEL(DATA) { ... }`: how completions are sampled.
GENERATION_PROPERTIES = {
    p.name: p
    for p in (
        P("samples", "int", 4),  # completions per prompt (a group, for group-relative losses)
        P("max_new_tokens", "int", 64),
        P("temperature", "float", 1.0),  # 0: greedy
        P("top_p", "float", 1.0),
        P("stop", "ints", []),  # token ids that end a completion, beside the tokenizer's end token
        P("iterations", "int", 1),  # optimizer steps on each batch of rollouts (GRPO's mu)
        # ZeRO-3: weights gathered once per generation, layer by layer, or once if the memory
        # estimate says the whole model fits beside the rest (dsgraph/dsconfig/auto.py)
        P("gather", "str", "auto"),
    )
}
GATHER_MODES = ("once", "layers", "auto")
# What a generation gives, per completion: prompt and completion tokens (left-padded prompt,
# completion after it, padding after its end), the mask of real tokens, the mask of completion
# tokens, and the log-probability each token had when it was sampled (0 elsewhere).
GENERATION_FIELDS = ("input_ids", "attention_mask", "completion_mask", "logprobs")

ADAPTERS = {
    b.name: b
    for b in (
        Builtin(
            "lora",
            (
                P("r", "int", 8),
                P("alpha", "float", 16.0),
                P("dropout", "float", 0.0),
                P("targets", "strs", None),
                P("merge", "bool", False),
            ),
            summary="a LoRA adapter (PEFT): only the adapter is trained; merge=true also exports merged weights",
        ),
    )
}

# `quantize = bnb4(...)`: the weights of a Hugging Face model's Linear layers loaded in 4 bits
# (bitsandbytes, as QLoRA does); the packed weights are stored in the model's precision dtype.
QUANTIZERS = {
    b.name: b
    for b in (
        Builtin(
            "bnb4",
            (P("type", "str", "nf4"), P("double_quant", "bool", True)),
            summary="4-bit weights (bitsandbytes): type nf4 or fp4; double_quant also quantizes the scales",
        ),
    )
}
QUANT_TYPES = ("nf4", "fp4")

OPTIMIZERS = {
    b.name: b
    for b in (
        Builtin(
            "adamw",
            (
                P("lr", "float"),
                P("weight_decay", "float", 0.01),
                P("betas", "floats", [0.9, 0.999]),
                P("eps", "float", 1e-8),
            ),
        ),
        Builtin(
            "adam",
            (
                P("lr", "float"),
                P("weight_decay", "float", 0.0),
                P("betas", "floats", [0.9, 0.999]),
                P("eps", "float", 1e-8),
            ),
        ),
        Builtin("sgd", (P("lr", "float"), P("momentum", "float", 0.0), P("weight_decay", "float", 0.0))),
    )
}

# DeepSpeed optimizer types; DeepSpeed falls back to torch.optim for names it does not know.
DEEPSPEED_OPTIMIZER_TYPES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}

SCHEDULERS = {
    b.name: b
    for b in (
        Builtin("constant", ()),
        Builtin("warmup", (P("warmup_steps", "int"), P("min_lr", "float", 0.0))),
        Builtin("warmup_decay", (P("warmup_steps", "int"), P("min_lr", "float", 0.0))),
        Builtin("warmup_cosine", (P("warmup_steps", "int"), P("min_ratio", "float", 0.0))),
    )
}

SETTINGS = {
    p.name: p
    for p in (
        P("seed", "int", 0),
        P("steps", "int", None),
        P("epochs", "int", None),
        P("micro_batch", "int"),
        P("grad_accum", "int", 1),
        P("log_every", "int", 10),
        P("checkpoint_every", "int", 0),
        P("precision", "str", "fp32"),
        P("eval_every", "int", 0),
        P("track", "strs", []),  # experiment trackers beside metrics.jsonl: tensorboard, mlflow, wandb
        P("rank_metrics", "bool", False),  # also each rank's own losses: ranks/rankN.metrics.jsonl
        P("cache_dir", "str", ""),  # where hoisted outputs are cached ("": RUN_DIR/cache), relative to the .dsg
        P("cache_budget", "float", 16.0),  # GiB of disk that `cache = auto` may fill
    )
}

# `data NAME = SOURCE { ... }`: how the data set is dealt, and its eval set.
DATA_PROPERTIES = {
    p.name: p
    for p in (
        P("eval", "name", None),  # the data set evaluation reads in this one's place
        P("shuffle", "bool", True),
        P("drop_last", "bool", True),
        P("workers", "int", 0),
        P("collate", "factory", None),  # `collate = my.pkg:make(...)` returns the DataLoader's collate_fn
        # the same sample for the same index, every time (a factory's data, a collate: say so to cache)
        P("deterministic", "bool", None),
    )
}


def eval_stats(loss: str, options: dict[str, Any]) -> tuple[str, ...]:
    """What an evaluation reports beside a built-in loss's value, each an exact mean over the
    whole eval set: accuracy for classification, token accuracy and perplexity for a causal LM's
    next-token cross-entropy (`shift = true`), and what the loss reports in training."""
    if loss == "ce":
        return ("token_accuracy", "perplexity") if options.get("shift") is True else ("accuracy",)
    return LOSSES[loss].stats


# Reported as exp(mean) rather than the mean of what the loss adds up (the mean negative
# log-likelihood per token).
EXP_STATS = frozenset({"perplexity"})

MODEL_PROPERTIES = (
    "zero",
    "frozen",
    "optimizer",
    "scheduler",
    "clip",
    "precision",
    "lora",
    "engine",
    "zero_init",  # false: a ZeRO-3 model built whole, partitioned by prepare/initialize
    "gradient_checkpointing",  # Hugging Face models: recompute activations in the backward
    "quantize",  # Hugging Face models: 4-bit weights (QLoRA), QUANTIZERS
    "cache",  # frozen models: true | false | auto, outputs computed once before the loop (hoist.py)
    "train_mode",  # frozen models: run in train mode (dropout on), still without gradients
)
CACHE_MODES = ("true", "false", "auto")
ENGINES = ("native", "accelerate")  # `engine = native`: deepspeed.initialize; `accelerate`: Accelerate's prepare
# hf("dir", task=...): the AutoModel class; without it, the class the config names
HF_TASKS = ("causal_lm", "sequence_classification", "model")
PRECISIONS = ("fp32", "bf16", "fp16")
TRACKERS = ("tensorboard", "mlflow", "wandb")  # `track = [...]`: dsgraph/runtime/trackers.py
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def type_matches(kind: str, value: Any) -> bool:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    match kind:
        case "int":
            return isinstance(value, int) and not isinstance(value, bool)
        case "float":
            return number(value)
        case "str":
            return isinstance(value, str)
        case "bool":
            return isinstance(value, bool)
        case "ints":
            return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        case "floats":
            return isinstance(value, list) and all(number(v) for v in value)
        case "strs":
            return isinstance(value, list) and all(isinstance(v, str) for v in value)
        case "name":
            return isinstance(value, str)
    return True


TYPE_WORDS = {
    "int": "a whole number",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "ints": "a list of whole numbers",
    "floats": "a list of numbers",
    "strs": "a list of strings",
    "tensor": "a tensor",
    "any": "a value",
    "name": "a name",
    "generation": "a generation, by its name",
    "tokens": "a generation by its name, or labels",
    "factory": "a factory, package.module:function(...)",
}
