"""Knowledge distillation written by hand with Accelerate's multi-plugin API and DeepSpeed: the
same work as `dsgraph run pipelines/distill.dsg`, wired the way a user would wire it. It is the
baseline of benchmarks/overhead.py (issue 3).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/accelerate_distill.py \
        --out result.json [--steps 300] [--deepspeed-configs RUN_DIR/deepspeed_configs] [--save-dir DIR]

Same as the pipeline: a frozen ZeRO-3 teacher mlp(32 -> 128 -> 128 -> 8) and a ZeRO-2 student
mlp(32 -> 32 -> 8), each built from dsgraph's per-model seed; the built-in synthetic data set,
16 samples per process per step, each rank its own shard in dsgraph's order; loss
0.5 * kl(T=2) + 0.5 * ce; AdamW with warm-up from the DeepSpeed config; the mean loss over the
ranks logged every 10 steps. The DeepSpeed configs below are the ones dsgraph resolves for
2 processes on CPU; `--deepspeed-configs` reads them from a dsgraph run instead.

Rank 0 writes --out: the loss of every step (mean over ranks), the wall time of every step, and
the start-up time (process start to the first step)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()  # unix time this process was started

# The environment dsgraph gives its workers (DS_ACCELERATOR=cpu, OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR, ACCELERATE_USE_DEEPSPEED): set before torch and DeepSpeed are imported.
from dsgraph.runtime.env import worker_environment  # noqa: E402

os.environ.update(worker_environment(int(os.environ.get("WORLD_SIZE", "1"))))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DeepSpeedPlugin, DummyOptim, DummyScheduler, InitProcessGroupKwargs  # noqa: E402

from dsgraph.runtime.builtins import ce, kl, mlp, synthetic_classification  # noqa: E402
from dsgraph.runtime.data import data_seed, sharded_loader  # noqa: E402
from dsgraph.runtime.executor import model_seed  # noqa: E402

SEED = 0
MICRO_BATCH = 16
LOG_EVERY = 10

STUDENT_CONFIG = {
    "bf16": {"enabled": False},
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 0.005, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.01, "torch_adam": True},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.005, "warmup_num_steps": 10, "warmup_type": "linear"},
    },
    "steps_per_print": 1000000,
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 16,
    "zero_optimization": {
        "stage": 2,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 1024,
        "allgather_bucket_size": 1024,
    },
}
TEACHER_CONFIG = {
    "gradient_accumulation_steps": 1,
    "steps_per_print": 1000000000,
    "train_batch_size": 32,
    "train_micro_batch_size_per_gpu": 16,
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": 16384,
        "stage3_prefetch_bucket_size": 14745,
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file written by rank 0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--deepspeed-configs",
        type=Path,
        default=None,
        help="a dsgraph run's deepspeed_configs/ folder (student.json, teacher.json)",
    )
    parser.add_argument("--save-dir", type=Path, default=None, help="save the trained student here")
    args = parser.parse_args()

    student_config, teacher_config = STUDENT_CONFIG, TEACHER_CONFIG
    if args.deepspeed_configs is not None:
        student_config = json.loads((args.deepspeed_configs / "student.json").read_text())
        teacher_config = json.loads((args.deepspeed_configs / "teacher.json").read_text())

    # One Accelerator, two plugins: the student's first. gloo must be named on CPU, or Accelerate
    # silently runs single-process while DeepSpeed runs with the launcher's world size.
    accelerator = Accelerator(
        deepspeed_plugins={
            "student": DeepSpeedPlugin(hf_ds_config=student_config),
            "teacher": DeepSpeedPlugin(hf_ds_config=teacher_config),
        },
        mixed_precision="no",
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == int(os.environ["WORLD_SIZE"]), "Accelerate does not see every process"

    # The student: built, then prepared first (accelerator.backward drives the first engine).
    accelerator.state.select_deepspeed_plugin("student")
    torch.manual_seed(model_seed(SEED, "student"))
    student = mlp(inputs=32, hidden=[32], outputs=8)
    optimizer = DummyOptim(student.parameters())  # AdamW and WarmupLR come from the config
    scheduler = DummyScheduler(optimizer)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    student.train()

    # The teacher: its plugin selected before it is built, partitioned as it is built (ZeRO-3).
    accelerator.state.select_deepspeed_plugin("teacher")
    torch.manual_seed(model_seed(SEED, "teacher"))
    with deepspeed.zero.Init(config_dict_or_path=accelerator.state.deepspeed_plugin.deepspeed_config):
        teacher = mlp(inputs=32, hidden=[128, 128], outputs=8)
    teacher.requires_grad_(False)
    teacher = accelerator.prepare(teacher)
    teacher.eval()

    # The data: each rank reads its own shard (batch k of the shuffled order goes to rank k mod 2).
    dataset = synthetic_classification(samples=4096, features=32, classes=8)
    loader = sharded_loader(dataset, MICRO_BATCH, data_seed(SEED, 0), rank, world)

    def batches():  # endless: a new epoch (a new shuffle) when one ends
        while True:
            yield from loader

    accelerator.state.select_deepspeed_plugin("student")  # the training plugin, for the loop

    torch.manual_seed(SEED * 7919 + rank)  # dropout RNG per rank, as dsgraph seeds it
    local_losses, step_times = [], []
    data = batches()
    first_step = time.time()
    tick = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(data)
        x, y = batch["x"], batch["y"]
        with accelerator.accumulate(student):
            logits = student(x)
            with torch.no_grad():  # frozen teacher: no graph; ZeRO-3 gathers each layer
                teacher_logits = teacher(x)
            loss = 0.5 * kl(logits, teacher_logits, temperature=2.0) + 0.5 * ce(logits, y)
            accelerator.backward(loss)  # DeepSpeed: engine.backward + engine.step
            optimizer.step()  # no-ops under DeepSpeed, as in any Accelerate loop
            scheduler.step()
            optimizer.zero_grad()
        local_losses.append(loss.item())
        if step % LOG_EVERY == 0 or step == args.steps:
            mean = accelerator.reduce(loss.detach(), reduction="mean").item()  # sync point
            if rank == 0 and os.environ.get("VERBOSE"):
                print(f"step {step}  loss {mean:.6f}", flush=True)
        now = time.perf_counter()
        step_times.append(now - tick)
        tick = now
    train_time = sum(step_times)

    # The loss of every step, averaged over ranks (in float64, as dsgraph reports it).
    losses = torch.tensor(local_losses, dtype=torch.float64)
    torch.distributed.all_reduce(losses)
    losses /= world

    # The trained student, as dsgraph exports it. ZeRO-2 keeps whole parameters on every rank.
    # (accelerator.get_state_dict() would look at the config of the last prepared model, the
    # ZeRO-3 teacher's, and refuse.)
    if args.save_dir is not None and rank == 0:
        from safetensors.torch import save_file

        state = accelerator.unwrap_model(student).state_dict()
        args.save_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(args.save_dir / "model.safetensors"))

    if rank == 0:
        result = {
            "steps": args.steps,
            "world_size": world,
            "process_start_unix": PROCESS_START,
            "first_step_unix": first_step,
            "startup_s": first_step - PROCESS_START,
            "train_s": train_time,
            "losses": losses.tolist(),
            "step_times": step_times,
            "deepspeed_configs": {"student": student_config, "teacher": teacher_config},
            "versions": {
                "torch": torch.__version__,
                "deepspeed": deepspeed.__version__,
                "accelerate": __import__("accelerate").__version__,
            },
        }
        args.out.write_text(json.dumps(result) + "\n")
        print(
            f"done: {args.steps} steps in {train_time:.2f} s, start-up {first_step - PROCESS_START:.2f} s, "
            f"last loss {losses[-1].item():.6f}",
            flush=True,
        )
    accelerator.end_training()  # also ends the process group
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
