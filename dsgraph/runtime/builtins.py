"""The built-in models, data sets and losses named `builtin.*` in .dsg files (their arguments are
declared in dsgraph/catalogue.py; a test holds the two in step)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dsgraph.runtime import policy as onpolicy
from dsgraph.runtime.generation import Rollouts
from dsgraph.runtime.hfdata import hf_dataset
from dsgraph.runtime.tokenizer import Tokenizer, load_tokenizer

# -- models ------------------------------------------------------------------------------------

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(
    inputs: int, outputs: int, hidden: Sequence[int] = (), dropout: float = 0.0, activation: str = "gelu"
) -> nn.Module:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(_ACTIVATIONS)}, not {activation!r}")
    layers: list[nn.Module] = []
    width = inputs
    for size in hidden:
        layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, outputs))
    model = nn.Sequential(*layers)
    model.hidden_size = max([inputs, outputs, *hidden])  # sizes DeepSpeed's buckets
    return model


class CausalLM(nn.Module):
    """A small decoder-only transformer: token and position embeddings, pre-norm blocks with a
    causal mask, a language-model head. Returns logits of shape (batch, length, vocab)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        self.hidden_size = dim
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        block = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        positions = torch.arange(length, device=input_ids.device)
        hidden = self.tokens(input_ids) + self.positions(positions)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).triu(1)
        padding = (attention_mask == 0) if attention_mask is not None else None
        hidden = self.blocks(hidden, mask=causal, src_key_padding_mask=padding, is_causal=True)
        return self.head(self.norm(hidden))


def causal_lm(
    vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 128, dropout: float = 0.0
) -> nn.Module:
    return CausalLM(vocab, dim, layers, heads, max_len, dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "causal_lm": causal_lm}

# -- data sets -----------------------------------------------------------------------------------


class TensorRecords(Dataset):
    """Named tensors of equal length; item i is a dict of their i-th rows."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: {sorted(lengths)}")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}


def synthetic_classification(samples: int, features: int, classes: int, seed: int = 0) -> Dataset:
    """Gaussian clusters, one per class: learnable, so losses fall."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, features, generator=gen) * 2.0
    y = torch.randint(0, classes, (samples,), generator=gen)
    x = centers[y] + torch.randn(samples, features, generator=gen)
    return TensorRecords({"x": x, "y": y})


def synthetic_tokens(samples: int, length: int, vocab: int = 256, seed: int = 0) -> Dataset:
    """Token sequences with a learnable pattern (each token predicts the next up to noise) and
    right padding of random length; labels are the inputs with padding set to -100."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (samples, 1), generator=gen)
    steps = torch.randint(1, 4, (samples, length), generator=gen).cumsum(1) - 1
    ids = (start + steps) % vocab
    lengths = torch.randint(max(2, length // 2), length + 1, (samples,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return TensorRecords({"input_ids": ids, "attention_mask": mask, "labels": labels})


def jsonl(path: str, fields: list[str] | None = None) -> Dataset:
    """One JSON object per line; numeric values and lists of numbers become tensors."""
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no records")
    names = fields or list(records[0])
    columns = {}
    for name in names:
        values = [r[name] for r in records]
        columns[name] = torch.tensor(values)
    return TensorRecords(columns)


def _records(path: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON: {error.msg}") from None
        missing = [k for k in keys if not isinstance(record.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{number}: needs the text field(s) {', '.join(missing)}")
        records.append(record)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _encode_pair(
    tokenizer: Tokenizer, prompt: str, answer: str, max_length: int, where: str
) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + answer` and their labels: -100 on the prompt, the ids on the answer
    (so losses and log-probabilities count only the answer), cut at max_length."""
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    head = start + tokenizer.encode(prompt)
    tail = tokenizer.encode(answer) + end
    if len(head) >= max_length:
        raise ValueError(
            f"{where}: the prompt alone takes {len(head)} tokens, max_length is {max_length}; "
            "raise max_length or shorten the prompt"
        )
    ids = (head + tail)[:max_length]
    labels = ([-100] * len(head) + tail)[:max_length]
    return ids, labels


def _padded(rows: list[tuple[list[int], list[int]]], max_length: int, pad: int) -> dict[str, torch.Tensor]:
    """Right padding to max_length: every batch has one shape (no recompilation, no ragged sync)."""
    ids = torch.full((len(rows), max_length), pad, dtype=torch.long)
    labels = torch.full((len(rows), max_length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_completions(tok: Tokenizer, records: Sequence[dict[str, Any]], max_length: int, where: str) -> Dataset:
    """Records {"prompt", "completion"}: input_ids, attention_mask, and labels that are -100 on the
    prompt and the padding. `where` names the records' source in errors (`file: record 3`)."""
    rows = [
        _encode_pair(tok, r["prompt"], r["completion"], max_length, f"{where} record {n}")
        for n, r in enumerate(records, 1)
    ]
    return TensorRecords(_padded(rows, max_length, tok.pad_token_id))


def encode_preferences(tok: Tokenizer, records: Sequence[dict[str, Any]], max_length: int, where: str) -> Dataset:
    """Records {"prompt", "chosen", "rejected"}: each answer after its prompt, as chosen_* and
    rejected_* input_ids, attention_mask and labels (-100 on prompt and padding)."""
    columns = {}
    for side in ("chosen", "rejected"):
        rows = [
            _encode_pair(tok, r["prompt"], r[side], max_length, f"{where} record {n} ({side})")
            for n, r in enumerate(records, 1)
        ]
        columns.update({f"{side}_{k}": v for k, v in _padded(rows, max_length, tok.pad_token_id).items()})
    return TensorRecords(columns)


def prompt_completion(path: str, tokenizer: str = "bytes", max_length: int = 128) -> Dataset:
    """JSONL lines {"prompt": ..., "completion": ...}, tokenized (`encode_completions`)."""
    tok = load_tokenizer(tokenizer, Path("."))
    return encode_completions(tok, _records(path, ("prompt", "completion")), max_length, f"{path}:")


def preference_pairs(path: str, tokenizer: str = "bytes", max_length: int = 128) -> Dataset:
    """JSONL lines {"prompt": ..., "chosen": ..., "rejected": ...}, tokenized (`encode_preferences`)."""
    tok = load_tokenizer(tokenizer, Path("."))
    return encode_preferences(tok, _records(path, ("prompt", "chosen", "rejected")), max_length, f"{path}:")


class Prompts(TensorRecords):
    """Prompts to complete: input_ids left-padded to max_length (the completion follows the last
    prompt token), attention_mask, and the tokenizer that reads them back."""

    def __init__(self, columns: dict[str, torch.Tensor], tokenizer: Tokenizer):
        super().__init__(columns)
        self.tokenizer = tokenizer


def prompts(path: str, tokenizer: str = "bytes", max_length: int = 64) -> Dataset:
    """JSONL lines {"prompt": ...} (other fields are ignored): the start token and the prompt,
    left-padded to max_length."""
    tok = load_tokenizer(tokenizer, Path("."))
    records = _records(path, ("prompt",))
    start = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = torch.full((len(records), max_length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(records), max_length), dtype=torch.long)
    for i, record in enumerate(records):
        row = start + tok.encode(record["prompt"])
        if len(row) > max_length:
            raise ValueError(
                f"{path}: record {i + 1}: the prompt takes {len(row)} tokens, max_length is {max_length}; "
                "raise max_length or shorten the prompt"
            )
        ids[i, max_length - len(row) :] = torch.tensor(row)
        mask[i, max_length - len(row) :] = 1
    return Prompts({"input_ids": ids, "attention_mask": mask}, tok)


DATA: dict[str, Callable[..., Dataset]] = {
    "synthetic_classification": synthetic_classification,
    "synthetic_tokens": synthetic_tokens,
    "jsonl": jsonl,
    "prompt_completion": prompt_completion,
    "preference_pairs": preference_pairs,
    "prompts": prompts,
    "hf_dataset": hf_dataset,
}

# -- losses --------------------------------------------------------------------------------------


def _flatten_logits(
    logits: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1) if target is not None else None
    return logits, target


def ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    shift: bool = False,
) -> torch.Tensor:
    """Cross-entropy, averaged over the targets that are not ignore_index. shift=true: position t
    predicts token t+1 (a causal LM's logits against its own input labels)."""
    if shift:
        logits, target = logits[..., :-1, :], target[..., 1:]
    logits, target = _flatten_logits(logits, target)
    assert target is not None
    if _recording is not None:  # an evaluation: accuracy, and perplexity for a language model
        counted = target != ignore_index
        tokens = counted.sum().double()
        correct = ((logits.argmax(-1) == target) & counted).sum().double()
        if shift:
            nll = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="sum")
            _report(token_accuracy=(correct, tokens), perplexity=(nll.double(), tokens))
        else:
            _report(accuracy=(correct, tokens))
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, label_smoothing=label_smoothing)


class TopK(NamedTuple):
    """A teacher's K largest log-probabilities at each position, and their class ids: what
    `kl(..., topk=K)` reads (from the cache, or taken from the live teacher's logits)."""

    logp: torch.Tensor  # [..., K] float32
    ids: torch.Tensor  # [..., K] int64


def topk_of(logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The K largest log-probabilities of softmax(logits / T) over the last dimension."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(values, ids)


def kl(
    student: torch.Tensor,
    teacher: torch.Tensor | TopK,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al.)
    so that gradients keep their scale; averaged over rows (tokens for sequence models), or over
    the rows where `mask` is non-zero (the attention mask: padding does not count). With `topk`,
    over the teacher's K most likely classes, the rest of both distributions as one class."""
    t = float(temperature)
    student, _ = _flatten_logits(student)
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    if topk is not None or isinstance(teacher, TopK):
        top = teacher if isinstance(teacher, TopK) else topk_of(teacher, int(topk or 0), t)
        per_token = _topk_kl(log_p_student, top)
    else:
        teacher, _ = _flatten_logits(teacher)
        log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
        if mask is None:
            return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t
        per_token = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    if mask is None:
        return per_token.sum() / per_token.shape[0] * t * t
    weights = mask.reshape(-1).to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0) * t * t


def _topk_kl(log_q: torch.Tensor, top: TopK) -> torch.Tensor:
    """Per row: KL(p || q) over the support of p's top K, with the mass outside it as one more
    class on both sides: sum_k p_k (log p_k - log q_k) + p_rest (log p_rest - log q_rest). Exact
    when K is every class (there is no rest then). `log_q`: [N, V]; `top`: [..., K]."""
    k = top.logp.shape[-1]
    log_p = top.logp.reshape(-1, k).float()
    ids = top.ids.reshape(-1, k).long()
    log_q_top = log_q.gather(-1, ids)
    p = log_p.exp()
    per_row = (p * (log_p - log_q_top)).sum(-1)
    if k >= log_q.shape[-1]:
        return per_row
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    # log q_rest over the classes outside the top K; their log q is masked with the lowest finite
    # value (not -inf: a row whose rest is empty keeps a finite gradient, multiplied by 0)
    outside = log_q.scatter(-1, ids, torch.finfo(log_q.dtype).min)
    log_q_rest = torch.logsumexp(outside, dim=-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-30).log() - log_q_rest), torch.zeros_like(p_rest))
    return per_row + rest


# -- statistics a loss reports beside its value (catalogue: `stats`), logged by the run -----------

Stat = tuple[torch.Tensor, torch.Tensor]  # (sum, count) over a batch
_recording: dict[str, Stat] | None = None


@contextlib.contextmanager
def recording_stats() -> Iterator[dict[str, Stat]]:
    """Collects what the losses evaluated inside report (`dpo`: reward_margin, reward_accuracy;
    `ce`: accuracy, or token_accuracy and perplexity), each as a (sum, count) pair: a logged step
    shows the ratio, an evaluation adds sums and counts up over the whole eval set."""
    global _recording
    previous, _recording = _recording, {}
    try:
        yield _recording
    finally:
        _recording = previous


def _report(**values: Stat) -> None:
    if _recording is not None:  # only on the steps that are logged, and in evaluations
        _recording.update({k: (total.detach(), count.detach()) for k, (total, count) in values.items()})


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per sequence: the sum over the labelled tokens (labels != -100) of
    the log-probability the logits at t give the label at t+1."""
    logits, labels = logits[:, :-1, :].float(), labels[:, 1:]
    keep = labels != -100
    picked = torch.gather(F.log_softmax(logits, dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * keep).sum(-1)


def dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_labels: torch.Tensor,
    rejected_labels: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """Direct Preference Optimization (Rafailov et al., 2023): -log sigmoid(beta * margin), where
    margin = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), over the
    sequence log-probabilities of the answers; averaged over the pairs. The four tensors are logits."""
    chosen = sequence_logprobs(policy_chosen, chosen_labels) - sequence_logprobs(reference_chosen, chosen_labels)
    rejected = sequence_logprobs(policy_rejected, rejected_labels) - sequence_logprobs(
        reference_rejected, rejected_labels
    )
    rewards = float(beta) * (chosen - rejected)  # the implicit rewards' difference, as TRL logs it
    if _recording is not None:
        pairs = torch.tensor(float(rewards.numel()), dtype=torch.float64, device=rewards.device)
        _report(reward_margin=(rewards.sum().double(), pairs), reward_accuracy=((rewards > 0).sum().double(), pairs))
    return -F.logsigmoid(rewards).mean()


def _per_completion(rewards: Any, rollouts: Rollouts) -> torch.Tensor:
    """Rewards as one number per completion: [N] or a column [N, 1] (a reward model's logits)."""
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"the rewards are a {type(rewards).__name__}, not a tensor")
    rows = rollouts.input_ids.shape[0]
    if rewards.numel() != rows or rewards.dim() > 2:
        raise ValueError(
            f"the rewards have shape {tuple(rewards.shape)}, not one number per completion ({rows}): "
            "a reward model needs one output (num_labels = 1)"
        )
    return rewards.reshape(-1).float()


def grpo(
    policy: torch.Tensor,
    rollouts: Rollouts,
    rewards: torch.Tensor,
    reference: torch.Tensor | None = None,
    beta: float = 0.04,
    epsilon: float = 0.2,
) -> torch.Tensor:
    """GRPO (dsgraph.runtime.policy.grpo) over a batch of rollouts, `policy` and `reference` the
    two models' logits over them: the advantages of the rewards
    within each prompt's group, the policy's and reference's token log-probabilities of the
    completion tokens under logits / T (the generation's temperature), the generation's own as
    the old ones."""
    if not isinstance(rollouts, Rollouts):
        raise TypeError("`grpo` takes the rollouts of a generation as its second argument")
    if beta and reference is None:
        raise ValueError("`grpo` with beta > 0 needs `reference=` (the frozen reference's logits), or beta = 0")
    r = _per_completion(rewards, rollouts)
    advantages = onpolicy.group_advantages(r, rollouts.samples)
    t, tokens = rollouts.temperature, rollouts.input_ids
    logp = onpolicy.token_logprobs(policy / t, tokens)
    ref = onpolicy.token_logprobs(reference / t, tokens) if reference is not None else None
    mask = rollouts.completion_mask[:, 1:]
    terms = onpolicy.grpo(logp, rollouts.logprobs[:, 1:], ref, advantages, mask, epsilon, beta)
    if _recording is not None:
        one = torch.ones((), dtype=torch.float64, device=r.device)
        lengths = rollouts.completion_lengths.double()
        _report(
            reward_mean=(r.double().sum(), one * r.numel()),
            reward_std=(r.double().std(), one),  # over this batch's completions
            kl=(terms.kl.double(), one),
            clip_fraction=(terms.clip_fraction.double(), one),
            completion_length=(lengths.sum(), one * lengths.numel()),
        )
    return terms.loss


def gkd(
    student: torch.Tensor, teacher: torch.Tensor, tokens: Any, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor:
    """GKD's generalised JSD (dsgraph.runtime.policy.generalized_jsd) between the distributions
    the logits give for each next token: over a generation's completion tokens (`tokens` the
    rollouts), or over the labelled tokens of a data set (`tokens` labels, -100 elsewhere)."""
    mask = tokens.completion_mask[:, 1:] if isinstance(tokens, Rollouts) else tokens[:, 1:] != -100
    return onpolicy.generalized_jsd(student[:, :-1], teacher[:, :-1], mask, beta, temperature)


def mse(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(input.float(), target.float())


def cosine(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(input.float(), target.float(), dim=-1)).mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": ce,
    "kl": kl,
    "mse": mse,
    "cosine": cosine,
    "dpo": dpo,
    "grpo": grpo,
    "gkd": gkd,
}

# -- rewards: called with the prompts and completions of a generation, one number each --------

_SUM = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*=\s*")


def sums(prompts: Sequence[str], completions: Sequence[str], exact: float = 1.0, digits: float = 0.5) -> list[float]:
    """The toy task of pipelines/data/sums.jsonl: `exact` when the completion is the sum the
    prompt `a+b=` asks for; otherwise `digits` times the share of digits among its characters
    (a shaping term that a policy which writes numbers at all collects first)."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        found = _SUM.fullmatch(prompt)
        text = completion.strip()
        if found and text == str(int(found[1]) + int(found[2])):
            out.append(float(exact))
        else:
            out.append(float(digits) * (sum(c.isdigit() for c in text) / len(text) if text else 0.0))
    return out


REWARDS: dict[str, Callable[..., list[float]]] = {"sums": sums}

__all__ = ["DATA", "LOSSES", "MODELS", "REWARDS"]
