"""The sums behind each logged row of metrics.jsonl: every loss, every term and every statistic a
built-in loss reports, summed over the micro steps of a logged step.

The sums stay on the device, and only logged steps keep them: reading a loss every step would
sync a GPU every step. Each loss is metered by the first op that computes it (a loss two groups
compute is logged once)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dsgraph import plan as P
from dsgraph.catalogue import EXP_STATS


class Meter:
    def __init__(self, plan: P.Plan, device: torch.device):
        first: dict[str, int] = {}  # loss -> the id of the op that meters it
        for op in plan.step:
            if isinstance(op, P.ComputeLoss):
                first.setdefault(op.loss, op.id)
        self._metered = frozenset(first.values())
        terms = [t for loss in first for t in plan.loss(loss).terms]
        self.losses = list(first)
        self.terms = [t.name for t in terms]
        self.stats = [f"{t.name}.{stat}" for t in terms for stat in t.stats]  # `kd/dpo.reward_margin`
        self._slot = {name: i for i, name in enumerate(self.losses + self.terms + self.stats)}
        self._device = device
        self._totals: torch.Tensor | None = None

    def start(self, logged: bool) -> None:
        """A new optimizer step; only a logged one is summed."""
        self._totals = torch.zeros(len(self._slot), dtype=torch.float64, device=self._device) if logged else None

    def metering(self, op: P.ComputeLoss) -> bool:
        return self._totals is not None and op.id in self._metered

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add a loss's, a term's or a statistic's value (by its name) to this step's sums."""
        assert self._totals is not None
        self._totals[self._slot[name]] += value.detach() if isinstance(value, torch.Tensor) else value

    def add_stats(self, term: P.Term, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for stat in term.stats:
            total, count = values[stat]
            self.add(f"{term.name}.{stat}", total / count)

    def means(
        self,
        all_reduce_mean: Callable[[torch.Tensor], torch.Tensor],
        micro_steps: int,
        local: dict[str, dict[str, float]] | None = None,
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """The step's losses, terms and stats, each the mean over micro steps and ranks; `local`
        receives this rank's own means (one more sync point)."""
        assert self._totals is not None
        mine = self._totals / micro_steps
        if local is not None:
            local.update(zip(("losses", "terms", "stats"), self._split(mine.tolist()), strict=True))
        mean = all_reduce_mean(mine).tolist()  # a sync point: once per logged step
        return self._split(mean)

    def _split(self, mean: list[float]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        losses, terms = len(self.losses), len(self.terms)
        return (
            dict(zip(self.losses, mean[:losses], strict=True)),
            dict(zip(self.terms, mean[losses : losses + terms], strict=True)),
            dict(zip(self.stats, mean[losses + terms :], strict=True)),
        )


class EvalMeter:
    """The sums of one evaluation: each loss and term weighted by the samples of its batch, each
    statistic as its sum and count; added up over the whole eval set and every rank by one
    all-reduce, so each figure is an exact mean over the eval set's samples (or tokens), never a
    mean of per-rank means."""

    def __init__(self, evaluation: P.Evaluation, device: torch.device):
        losses = [loss.name for loss in evaluation.losses]
        terms = [t for loss in evaluation.losses for t in loss.terms]
        self.losses, self.terms = losses, [t.name for t in terms]
        self.stats = [f"{t.name}.{stat}" for t in terms for stat in t.stats]
        # slot 0: samples; then one sum per loss and term; then a (sum, count) pair per statistic
        self._slot = {name: 1 + i for i, name in enumerate(losses + self.terms)}
        base = 1 + len(self._slot)
        self._stat_slot = {name: base + 2 * i for i, name in enumerate(self.stats)}
        self._totals = torch.zeros(base + 2 * len(self.stats), dtype=torch.float64, device=device)

    def add_batch(self, samples: int) -> None:
        self._totals[0] += samples

    def add(self, name: str, value: torch.Tensor | float, samples: int) -> None:
        """A loss's or term's mean over a batch of `samples` samples."""
        mean = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        self._totals[self._slot[name]] += mean * samples

    def add_stats(self, term: P.Term, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for stat in term.stats:
            total, count = values[stat]
            slot = self._stat_slot[f"{term.name}.{stat}"]
            self._totals[slot] += total
            self._totals[slot + 1] += count

    def results(
        self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[int, dict[str, float], dict[str, float], dict[str, float]]:
        """Samples, and the means of the losses, terms and stats over the whole eval set."""
        totals = all_reduce_sum(self._totals).tolist()  # a sync point: once per evaluation
        samples = totals[0]
        mean = {name: totals[slot] / samples for name, slot in self._slot.items()}
        stats = {}
        for name, slot in self._stat_slot.items():
            value = totals[slot] / totals[slot + 1] if totals[slot + 1] else float("nan")
            stats[name] = math.exp(value) if name.rpartition(".")[2] in EXP_STATS else value
        return (
            int(samples),
            {n: mean[n] for n in self.losses},
            {n: mean[n] for n in self.terms},
            stats,
        )
