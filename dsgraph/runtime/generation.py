"""Sampling completions from a causal LM for a batch of prompts: the `generate` op.

The loop is written out (no `model.generate`) so that every rank runs the same forwards, however
soon its own completions end (a ZeRO-3 forward is a collective: a rank that stopped early would
hang the others), and so that sampling draws from a generator of the generation's own, whose
state a checkpoint keeps. One forward over the prompts fills the key/value cache, then one
forward per new token; the loop ends after `max_new_tokens` or once every completion of every
rank has ended."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dsgraph import plan as P


@dataclass(frozen=True)
class Rollouts:
    """One batch of completions, `samples` per prompt laid out prompt by prompt. Every tensor is
    [N, P + max_new_tokens]: the left-padded prompt, then the completion, then padding after its
    end. `logprobs[i, t]` is the log-probability token t had when it was sampled, under
    softmax(logits / temperature) (T = 1 when greedy; top-p's truncation left out, as the losses
    model it), 0 outside the completion."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    samples: int
    temperature: float  # what the losses divide the policy's logits by (1 when greedy)
    prompts: tuple[str, ...] = ()  # decoded, one per completion
    completions: tuple[str, ...] = ()

    def field(self, name: str) -> torch.Tensor:
        if name not in ("input_ids", "attention_mask", "completion_mask", "logprobs"):
            raise KeyError(f"rollouts have no field `{name}`")
        value: torch.Tensor = getattr(self, name)
        return value

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def sample(
    model: Any,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    spec: P.Generation,
    generator: torch.Generator,
    stop_ids: tuple[int, ...],
    pad_id: int,
    any_rank_running: Callable[[bool], bool],
) -> Rollouts:
    """`spec.samples` completions of each prompt (left-padded `prompt_ids` [B, P]) from `model`,
    which the caller has put in eval mode under no_grad (and gathered, at ZeRO-3)."""
    ids = prompt_ids.repeat_interleave(spec.samples, dim=0)
    mask = prompt_mask.repeat_interleave(spec.samples, dim=0).long()
    rows, prompt_length = ids.shape
    device = ids.device
    # Positions count from the first column, padding included: what a forward over the rollouts
    # without position ids computes, so the losses' forwards see what sampling saw and the
    # log-probabilities recorded here are theirs (Transformers' generate would count real tokens).
    positions = torch.arange(prompt_length, device=device).expand(rows, -1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    next_position = torch.full((rows,), prompt_length, dtype=torch.long, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens = torch.full((rows, spec.max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, spec.max_new_tokens), dtype=torch.float32, device=device)
    live = torch.zeros((rows, spec.max_new_tokens), dtype=torch.long, device=device)
    for t in range(spec.max_new_tokens):
        token, logp = _pick(out.logits[:, -1, :], spec, generator)
        running = ~done
        tokens[:, t] = torch.where(running, token, pad_id)
        logprobs[:, t] = torch.where(running, logp, 0.0)
        live[:, t] = running.long()
        done = done | torch.isin(token, stop)
        last = t == spec.max_new_tokens - 1
        # A sync point per new token: the ranks stop together, when every completion has ended.
        if last or not any_rank_running(not bool(done.all())):
            break
        mask = torch.cat([mask, running.long().unsqueeze(1)], dim=1)
        out = model(
            input_ids=tokens[:, t : t + 1],
            attention_mask=mask,
            position_ids=next_position.unsqueeze(1),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_position = next_position + 1
    zeros = torch.zeros((rows, prompt_length), dtype=torch.long, device=device)
    return Rollouts(
        input_ids=torch.cat([ids, tokens], dim=1),
        attention_mask=torch.cat([mask[:, :prompt_length], live], dim=1),
        completion_mask=torch.cat([zeros, live], dim=1),
        logprobs=torch.cat([zeros.float(), logprobs], dim=1),
        samples=spec.samples,
        temperature=spec.temperature if spec.temperature > 0 else 1.0,
    )


def _pick(logits: torch.Tensor, spec: P.Generation, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-probability under softmax(logits / T)."""
    logits = logits.float()
    if spec.temperature == 0:  # greedy
        logp = F.log_softmax(logits, dim=-1)
        token = logits.argmax(dim=-1)
        return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    logp = F.log_softmax(logits / spec.temperature, dim=-1)
    probs = logp.exp()
    if spec.top_p < 1.0:  # nucleus: the smallest set of tokens whose probability reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > spec.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def decode(tokenizer: Any, ids: torch.Tensor, keep: torch.Tensor, drop: tuple[int, ...]) -> tuple[str, ...]:
    """The text of each row's kept tokens, without the special ids in `drop`."""
    out = []
    for row, row_keep in zip(ids.tolist(), keep.tolist(), strict=True):
        out.append(tokenizer.decode([t for t, k in zip(row, row_keep, strict=True) if k and t not in drop]))
    return tuple(out)
