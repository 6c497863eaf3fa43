"""Data: each data set gets its own DataLoader and its own torch.Generator seeded from the
pipeline seed. Every rank reads its own shard, in the order Accelerate's prepared DataLoader gives
(batch k of the shuffled order goes to rank k mod world size); epochs wrap."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler


def data_seed(pipeline_seed: int, index: int) -> int:
    return pipeline_seed * 1000 + 17 + index


class RankBatchSampler(Sampler[list[int]]):
    """What Accelerate's BatchSamplerShard yields for one rank: the batches of a shuffled
    BatchSampler dealt round-robin, rank r taking batches r, r+W, ... Its position (the generator
    state at the start of the epoch, and how many batches it has served since) can be saved and
    restored, so that a resumed run reads exactly the batches an uninterrupted one would."""

    def __init__(self, dataset: Dataset, micro_batch: int, seed: int, rank: int, world: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = BatchSampler(RandomSampler(dataset, generator=self.generator), micro_batch, drop_last=True)
        self.rank, self.world = rank, world
        self.epoch, self.position, self._skip = 0, 0, 0
        self._epoch_state = self.generator.get_state()
        self._started = False
        self.served: list[list[int]] | None = [] if os.environ.get("DSGRAPH_RECORD_SAMPLES") else None

    def __iter__(self) -> Iterator[list[int]]:
        if self._started:  # a new pass over the data: the next shuffle
            self.epoch += 1
        self._started = True
        self._epoch_state = self.generator.get_state()
        self.position, skip, self._skip = 0, self._skip, 0
        group: list[list[int]] = []
        for batch in self.batches:
            group.append(batch)
            if len(group) == self.world:
                mine, group = group[self.rank], []
                if skip:
                    skip -= 1
                    self.position += 1
                    continue
                if self.served is not None:  # tests check that ranks see disjoint samples
                    self.served.append(mine)
                self.position += 1
                yield mine

    def __len__(self) -> int:
        return len(self.batches) // self.world

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "generator": base64.b64encode(self._epoch_state.numpy().tobytes()).decode(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """The next iteration replays the saved epoch's shuffle and skips what was served."""
        if not 0 <= state["position"] <= len(self):
            raise ValueError(f"a data position of {state['position']} batches, in an epoch of {len(self)}")
        raw = base64.b64decode(state["generator"])
        self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.epoch, self._skip, self._started = state["epoch"], state["position"], False


def sharded_loader(dataset: Dataset, micro_batch: int, seed: int, rank: int, world: int) -> DataLoader:
    # The loader's own generator: each new iterator draws a base seed from it, not from the global
    # RNG, so starting an epoch (or a resumed run) never shifts the dropout masks.
    return DataLoader(
        dataset,
        batch_sampler=RankBatchSampler(dataset, micro_batch, seed, rank, world),
        generator=torch.Generator().manual_seed(seed + 1),
    )


class Batches:
    """Endless iteration over a loader: a new epoch (a new shuffle) when one ends."""

    def __init__(self, loader: DataLoader, name: str):
        self.loader = loader
        self.name = name
        if len(loader) == 0:
            raise ValueError(f"data set `{name}` has fewer samples than one global batch")
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def sampler(self) -> RankBatchSampler:
        return self.loader.batch_sampler

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def __len__(self) -> int:
        return len(self.loader)
