"""Data: each data set gets its own DataLoader and its own torch.Generator seeded from the
pipeline seed. Every rank reads its own shard, in the order Accelerate's prepared DataLoader gives
(batch k of the shuffled order goes to rank k mod world size); epochs wrap."""
from __future__ import annotations

import os
from typing import Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler


def data_seed(pipeline_seed: int, index: int) -> int:
    return pipeline_seed * 1000 + 17 + index


def make_loader(dataset: Dataset, micro_batch: int, seed: int) -> DataLoader:
    """The loader Accelerate prepares: shuffled by its own generator, whole batches only."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=micro_batch, sampler=RandomSampler(dataset, generator=generator),
                      drop_last=True)


class RankBatchSampler(Sampler[list[int]]):
    """What Accelerate's BatchSamplerShard yields for one rank, for the native-engine path:
    the batches of a shuffled BatchSampler dealt round-robin, rank r taking batches r, r+W, ..."""

    def __init__(self, dataset: Dataset, micro_batch: int, seed: int, rank: int, world: int):
        self.batches = BatchSampler(RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)),
                                    micro_batch, drop_last=True)
        self.rank, self.world = rank, world
        self.served: list[list[int]] | None = [] if os.environ.get("DSGRAPH_RECORD_SAMPLES") else None

    def __iter__(self) -> Iterator[list[int]]:
        group: list[list[int]] = []
        for batch in self.batches:
            group.append(batch)
            if len(group) == self.world:
                if self.served is not None:     # tests check that ranks see disjoint samples
                    self.served.append(group[self.rank])
                yield group[self.rank]
                group = []

    def __len__(self) -> int:
        return len(self.batches) // self.world


def sharded_loader(dataset: Dataset, micro_batch: int, seed: int, rank: int, world: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=RankBatchSampler(dataset, micro_batch, seed, rank, world))


class Batches:
    """Endless iteration over a loader: a new epoch (a new shuffle) when one ends."""

    def __init__(self, loader, name: str):
        self.loader = loader
        self.name = name
        self.epoch = 0
        self._it = iter(loader)
        if len(loader) == 0:
            raise ValueError(f"data set `{name}` has fewer samples than one global batch")

    def next(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            return next(self._it)

    def __len__(self) -> int:
        return len(self.loader)
