"""What a factory may learn of the run: declare a keyword parameter named `run` and dsgraph passes
a `RunContext` (unless the .dsg call gives `run=` itself).

    def my_data(path: str, *, run: RunContext) -> Dataset:
        rows = load(path)
        return rows[run.rank :: run.world_size]      # shard it yourself, consistently with the run

Nothing here imports torch: the compile path may import this module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunContext:
    seed: int  # the pipeline's `seed`
    rank: int  # this process, 0 .. world_size - 1
    world_size: int
    micro_batch: int  # samples per process per micro step
    grad_accum: int
    model_seed: int | None = None  # a model factory: the seed its weights are drawn from
