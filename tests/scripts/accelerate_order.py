"""Run with 2 processes: the batches dsgraph deals each rank (RankBatchSampler) are the batches
Accelerate's prepared DataLoader gives that rank, epoch after epoch."""

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from torch.utils.data import DataLoader, RandomSampler

from dsgraph.runtime.builtins import TensorRecords
from dsgraph.runtime.data import Batches, sharded_loader

config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2}}
accelerator = Accelerator(
    deepspeed_plugins={"m": DeepSpeedPlugin(hf_ds_config=config)},
    kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
)
rank, world = accelerator.process_index, accelerator.num_processes
dataset = TensorRecords({"i": torch.arange(50)})
seed = 1234
shuffled = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
reference = accelerator.prepare(DataLoader(dataset, batch_size=4, drop_last=True, sampler=shuffled))
ours = Batches(sharded_loader(dataset, 4, seed, rank, world), "d")
expected = [b["i"].tolist() for _ in range(3) for b in reference]
actual = [ours.next()["i"].tolist() for _ in range(len(expected))]
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as out:
    json.dump({"rank": rank, "world": world, "expected": expected, "actual": actual}, out)
accelerator.end_training()
