"""The built-in models, data sets and losses named `builtin.*` in .dsg files (their arguments are
declared in dsgraph/catalogue.py; a test holds the two in step)."""
from __future__ import annotations

import json

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

# -- models ------------------------------------------------------------------------------------

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


def mlp(inputs: int, outputs: int, hidden: list[int] = (), dropout: float = 0.0,
        activation: str = "gelu") -> nn.Module:
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
    model.hidden_size = max([inputs, outputs, *hidden])        # sizes DeepSpeed's buckets
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
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
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


def causal_lm(vocab: int = 256, dim: int = 64, layers: int = 2, heads: int = 4, max_len: int = 128,
              dropout: float = 0.0) -> nn.Module:
    return CausalLM(vocab, dim, layers, heads, max_len, dropout)


MODELS = {"mlp": mlp, "causal_lm": causal_lm}

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


DATA = {"synthetic_classification": synthetic_classification, "synthetic_tokens": synthetic_tokens,
        "jsonl": jsonl}

# -- losses --------------------------------------------------------------------------------------


def _flatten_logits(logits: torch.Tensor, target: torch.Tensor | None = None):
    if logits.dim() > 2:
        logits = logits.reshape(-1, logits.shape[-1])
        target = target.reshape(-1) if target is not None else None
    return logits, target


def ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
       label_smoothing: float = 0.0) -> torch.Tensor:
    logits, target = _flatten_logits(logits, target)
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al.)
    so that gradients keep their scale; averaged over rows (tokens for sequence models)."""
    student, _ = _flatten_logits(student)
    teacher, _ = _flatten_logits(teacher)
    t = float(temperature)
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def mse(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(input.float(), target.float())


def cosine(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(input.float(), target.float(), dim=-1)).mean()


LOSSES = {"ce": ce, "kl": kl, "mse": mse, "cosine": cosine}

__all__ = ["MODELS", "DATA", "LOSSES"]
