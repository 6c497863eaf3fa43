"""Data: each data set gets its own DataLoader and its own torch.Generator seeded from the
pipeline seed. Every rank reads its own shard, in the order Accelerate's prepared DataLoader gives
(batch k of the epoch's order goes to rank k mod world size; an uneven end is dropped, or with
`drop_last = false` completed from the start of the epoch as Accelerate's `even_batches` does);
epochs wrap. An eval set is read once per evaluation, in file order, nothing dropped or repeated."""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, default_collate


def data_seed(pipeline_seed: int, index: int) -> int:
    return pipeline_seed * 1000 + 17 + index


def global_batches(order: list[int], micro_batch: int, world: int, drop_last: bool) -> list[list[int]]:
    """The batches of one epoch over all ranks, as Accelerate's BatchSamplerShard deals them
    (`even_batches`, not `split_batches`): with drop_last, only whole rounds of whole batches;
    without, the last batch and the last round completed with samples from the epoch's start."""
    batches = [order[i : i + micro_batch] for i in range(0, len(order), micro_batch)]
    if drop_last:
        whole = [b for b in batches if len(b) == micro_batch]
        return whole[: len(whole) // world * world]
    if not batches:
        return []
    start = [i for b in batches[:world] for i in b]
    while len(start) < world * micro_batch:
        start += start
    cycle = micro_batch - len(batches[-1])
    batches[-1] = batches[-1] + start[:cycle]
    while len(batches) % world:
        batches.append(start[cycle : cycle + micro_batch])
        cycle += micro_batch
    return batches


class RankBatchSampler(Sampler[list[int]]):
    """What Accelerate's BatchSamplerShard yields for one rank: the batches of the epoch's order
    (shuffled, or file order) dealt round-robin, rank r taking batches r, r+W, ... Its position
    (the generator state at the start of the epoch, and how many batches it has served since) can
    be saved and restored, so that a resumed run reads exactly the batches an uninterrupted one
    would."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch: int,
        seed: int,
        rank: int,
        world: int,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.generator = torch.Generator().manual_seed(seed)
        self.order: Sampler[int] = (
            RandomSampler(dataset, generator=self.generator) if shuffle else SequentialSampler(dataset)
        )
        self.micro_batch, self.drop_last, self.size = micro_batch, drop_last, len(dataset)
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
        batches = global_batches(list(self.order), self.micro_batch, self.world, self.drop_last)
        for mine in batches[self.rank :: self.world]:
            if skip:
                skip -= 1
                self.position += 1
                continue
            if self.served is not None:  # tests check that ranks see disjoint samples
                self.served.append(mine)
            self.position += 1
            yield mine

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.micro_batch // self.world
        return math.ceil(math.ceil(self.size / self.micro_batch) / self.world)

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


class Indexed(Dataset):
    """A data set whose items carry their index: the cache's rows are read by sample index."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class IndexedCollate:
    """The collate function of an `Indexed` data set: (the batch's sample indices, the batch as
    the data set's own collate function makes it)."""

    def __init__(self, collate: Callable[[list[Any]], Any] | None):
        self.collate = collate or default_collate

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[torch.Tensor, Any]:
        return torch.tensor([i for i, _ in items]), self.collate([item for _, item in items])


def indexed(dataset: Dataset, collate: Callable[[list[Any]], Any] | None) -> tuple[Dataset, IndexedCollate]:
    return Indexed(dataset), IndexedCollate(collate)


def sharded_loader(
    dataset: Dataset,
    micro_batch: int,
    seed: int,
    rank: int,
    world: int,
    shuffle: bool = True,
    drop_last: bool = True,
    workers: int = 0,
    collate: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    # The loader's own generator: each new iterator draws a base seed from it, not from the global
    # RNG, so starting an epoch (or a resumed run) never shifts the dropout masks.
    return DataLoader(
        dataset,
        batch_sampler=RankBatchSampler(dataset, micro_batch, seed, rank, world, shuffle, drop_last),
        generator=torch.Generator().manual_seed(seed + 1),
        num_workers=workers,
        collate_fn=collate,
    )


class EvalShard:
    """This rank's share of an eval set: batch k of the file order (the last one possibly short)
    goes to rank k mod world size. Every rank runs the same number of batches, so that each
    forward is a collective every rank joins (ZeRO-3 gathers parameters in it); a rank left
    without a batch in the last round runs the first batch again, weighted 0."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch: int,
        rank: int,
        world: int,
        workers: int = 0,
        collate: Callable[[list[Any]], Any] | None = None,
    ):
        size = len(dataset)
        if size == 0:
            raise ValueError("the eval set is empty")
        batches = [list(range(i, min(i + micro_batch, size))) for i in range(0, size, micro_batch)]
        rounds = math.ceil(len(batches) / world)
        mine = [rnd * world + rank for rnd in range(rounds)]
        self.indices = [batches[k] if k < len(batches) else batches[0] for k in mine]
        self.weights = [len(batches[k]) if k < len(batches) else 0 for k in mine]  # samples counted
        self.size = size
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.indices,
            generator=torch.Generator().manual_seed(0),
            num_workers=workers,
            collate_fn=collate,
        )

    def __len__(self) -> int:
        return len(self.indices)


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
