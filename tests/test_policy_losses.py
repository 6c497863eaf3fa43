"""The on-policy losses (dsgraph/runtime/policy.py) against hand computations on fixed numbers:
GRPO's advantages, clipped ratio and k3 KL, and GKD's generalised JSD at its two ends and between."""

from __future__ import annotations

import math

import pytest
import torch

from dsgraph.runtime.policy import generalized_jsd, group_advantages, grpo, token_logprobs


def test_group_advantages_are_normalised_within_each_prompts_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0])  # prompt 0: 1, 0, 0; prompt 1: 1, 3, 3
    a = group_advantages(rewards, 3)
    std0 = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # Bessel's correction
    assert a[0].item() == pytest.approx((2 / 3) / (std0 + 1e-4), abs=1e-6)
    assert a[1].item() == pytest.approx((-1 / 3) / (std0 + 1e-4), abs=1e-6)
    assert a[3].item() == pytest.approx((-4 / 3) / (math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2) + 1e-4), abs=1e-6)
    assert abs(a[:3].sum().item()) < 1e-6 and abs(a[3:].sum().item()) < 1e-6
    with pytest.raises(ValueError, match="groups of 1"):
        group_advantages(rewards, 1)


def test_grpo_equals_a_hand_computation_on_a_fixed_batch():
    """Two sequences of three tokens, the last token of the second padding. Sequence 0 (A = 1):
    ratios e^0.1, e^0.5 (above 1.2: the clipped term is the smaller), e^-0.1; sequence 1 (A = -1):
    ratios e^-0.4 (below 0.8: -0.8 is the smaller term), e^0."""
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-1.4, -0.3, -9.0]])
    old = torch.tensor([[-1.1, -1.0, -1.9], [-1.0, -0.3, -9.0]])
    ref = torch.tensor([[-1.2, -0.4, -2.0], [-1.5, -0.2, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    eps, beta = 0.2, 0.1

    def token(lp: float, o: float, r: float, a: float) -> float:
        ratio = math.exp(lp - o)
        clipped = min(max(ratio, 1 - eps), 1 + eps)
        k3 = math.exp(r - lp) - (r - lp) - 1
        return -min(ratio * a, clipped * a) + beta * k3

    seq0 = sum(token(logp[0, t].item(), old[0, t].item(), ref[0, t].item(), 1.0) for t in range(3)) / 3
    seq1 = sum(token(logp[1, t].item(), old[1, t].item(), ref[1, t].item(), -1.0) for t in range(2)) / 2
    terms = grpo(logp, old, ref, adv, mask, eps, beta)
    assert terms.loss.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    assert terms.clip_fraction.item() == pytest.approx(2 / 5)  # e^0.5 and e^-0.4
    k3s = [
        math.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]).item() - 1
        for i, t in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    ]
    assert terms.kl.item() == pytest.approx(sum(k3s) / 5, abs=1e-6)


def test_grpo_on_policy_starts_with_zero_kl_and_the_advantage_weighted_gradient():
    """At the first pass the policy is the generator and the reference: ratio 1, KL 0, and the
    gradient of the loss is -A_i / |o_i| on each completion token's log-probability."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([0.5, -1.5])
    terms = grpo(logp, logp.detach(), logp.detach(), adv, torch.ones(2, 2), 0.2, 0.04)
    assert terms.kl.item() == 0.0 and terms.clip_fraction.item() == 0.0
    (grad,) = torch.autograd.grad(terms.loss, logp)
    assert torch.allclose(grad, torch.tensor([[-0.5, -0.5], [1.5, 1.5]]) / 2 / 2)


def test_token_logprobs_read_each_next_token():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.1, 0.9], [0.3, 0.7]]]))
    assert torch.allclose(token_logprobs(logits, torch.tensor([[0, 1, 0]])), torch.log(torch.tensor([[0.5, 0.1]])))


def test_generalized_jsd_is_forward_kl_at_0_reverse_kl_at_1_and_symmetric_jsd_at_half():
    p = torch.tensor([[0.7, 0.2, 0.1]])  # teacher
    q = torch.tensor([[0.4, 0.4, 0.2]])  # student
    mask = torch.ones(1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * (a / b).log()).sum())

    assert generalized_jsd(q.log(), p.log(), mask, 0.0).item() == pytest.approx(kl(p, q), abs=1e-6)
    assert generalized_jsd(q.log(), p.log(), mask, 1.0).item() == pytest.approx(kl(q, p), abs=1e-6)
    m = 0.5 * p + 0.5 * q
    assert generalized_jsd(q.log(), p.log(), mask, 0.5).item() == pytest.approx(
        0.5 * kl(p, m) + 0.5 * kl(q, m), abs=1e-6
    )
    m = 0.9 * p + 0.1 * q
    assert generalized_jsd(q.log(), p.log(), mask, 0.9).item() == pytest.approx(
        0.9 * kl(p, m) + 0.1 * kl(q, m), abs=1e-6
    )
    assert generalized_jsd(p.log(), p.log(), mask, 0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_the_builtin_grpo_over_rollouts_equals_a_hand_computation():
    """The loss a `.dsg` file's `grpo(policy(...).logits, rollouts, rewards, reference=...)` runs,
    on a fixed batch: 2 prompts x 2 samples, a 2-token prompt and 2 completion tokens (the last
    of completion 1 is padding), a 3-token vocabulary, temperature 0.5, every number by hand."""
    from dsgraph.runtime.builtins import grpo as builtin_grpo
    from dsgraph.runtime.generation import Rollouts

    g = torch.Generator().manual_seed(3)
    policy = torch.randn(4, 4, 3, generator=g)
    reference = torch.randn(4, 4, 3, generator=g)
    ids = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 2], [2, 2, 0, 1], [2, 2, 1, 1]])
    completion = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    old = torch.zeros(4, 4)
    old[:, 2:] = torch.tensor([[-1.0, -1.2], [-0.7, 0.0], [-1.5, -0.2], [-0.9, -2.0]]) * completion[:, 2:]
    rewards = torch.tensor([[1.0], [0.0], [0.25], [0.75]])
    rollouts = Rollouts(ids, torch.ones(4, 4, dtype=torch.long), completion, old, samples=2, temperature=0.5)
    eps, beta, t = 0.2, 0.04, 0.5

    def logp(logits: torch.Tensor, i: int, pos: int) -> float:  # of token `pos`, from position pos - 1
        row = [float(v) / t for v in logits[i, pos - 1]]
        return row[int(ids[i, pos])] - math.log(sum(math.exp(v) for v in row))

    r = [1.0, 0.0, 0.25, 0.75]
    advantages = []
    for group in (r[:2], r[2:]):
        mean = sum(group) / 2
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / 1)
        advantages += [(x - mean) / (std + 1e-4) for x in group]
    per_sequence = []
    for i in range(4):
        terms = []
        for pos in (2, 3):
            if not completion[i, pos]:
                continue
            lp, ref = logp(policy, i, pos), logp(reference, i, pos)
            ratio = math.exp(lp - float(old[i, pos]))
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            k3 = math.exp(ref - lp) - (ref - lp) - 1
            terms.append(-min(ratio * advantages[i], clipped * advantages[i]) + beta * k3)
        per_sequence.append(sum(terms) / len(terms))
    expected = sum(per_sequence) / 4
    got = builtin_grpo(policy, rollouts, rewards, reference=reference, beta=beta, epsilon=eps)
    assert got.item() == pytest.approx(expected, abs=1e-6)
