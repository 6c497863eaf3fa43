"""The losses of on-policy post-training, as functions of tensors; the built-in `grpo` and `gkd`
losses (dsgraph/runtime/builtins.py) apply them to the rollouts of a `generate` declaration.

- GRPO (DeepSeekMath; TRL's GRPOTrainer with loss_type "grpo"): group-normalised advantages, the
  clipped ratio of the policy's token log-probabilities to those recorded at generation, and
  beta times the k3 estimator of KL(policy || reference) per token.
- On-policy distillation (GKD, Agarwal et al.): the generalised Jensen-Shannon divergence between
  teacher and student at every completion token, beta = 0 the forward KL(teacher || student),
  beta = 1 the reverse KL(student || teacher)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) of each token after the first: logits [B, T, V] of a causal LM
    over `tokens` [B, T] -> [B, T - 1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].long().unsqueeze(-1)).squeeze(-1)


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps), for rewards laid out group by group
    (the `group` completions of prompt 0, then prompt 1's, ...); std with Bessel's correction, as
    TRL computes it."""
    if group < 2 or rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards cannot be split into groups of {group} (at least 2 each)")
    grouped = rewards.float().reshape(-1, group)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


class GRPOTerms(NamedTuple):
    loss: torch.Tensor  # 0-d
    kl: torch.Tensor  # mean per-token k3 KL to the reference over the completion tokens
    clip_fraction: torch.Tensor  # share of completion tokens whose ratio was clipped


def grpo(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    beta: float = 0.04,
) -> GRPOTerms:
    """Per completion token t of sequence i (all [B, T], `advantages` [B]):

        ratio = exp(logp - old_logp)
        l_it  = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * k3_it
        k3_it = exp(ref_logp - logp) - (ref_logp - logp) - 1

    averaged over each sequence's completion tokens (`mask`), then over the sequences."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages.to(logp.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon)
    per_token = -torch.min(ratio * a, clipped * a)
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        k3 = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * k3
    else:
        k3 = torch.zeros_like(logp)
    tokens = mask.sum(dim=1).clamp(min=1.0)
    loss = ((per_token * mask).sum(dim=1) / tokens).mean()
    total = mask.sum().clamp(min=1.0)
    was_clipped = ((ratio - clipped).abs() > 0).to(logp.dtype)
    return GRPOTerms(loss, ((k3 * mask).sum() / total).detach(), ((was_clipped * mask).sum() / total).detach())


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GKD's divergence at each masked position, averaged over them:

    beta = 0: KL(teacher || student);  beta = 1: KL(student || teacher)
    else:     beta * KL(teacher || M) + (1 - beta) * KL(student || M),  M = beta*teacher + (1-beta)*student"""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        per_token = (t.exp() * (t - s)).sum(-1)
    elif beta == 1:
        per_token = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        per_token = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
