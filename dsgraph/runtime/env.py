"""Process environment for workers: set before torch/deepspeed are imported.

Without CUDA, DeepSpeed must be told to use its CPU accelerator (gloo plus its shared-memory
all-reduce op); with 2 ranks on 2 cores, each rank gets one OpenMP thread."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def cuda_available() -> bool:
    """Cheap and torch-free: the driver decides before importing torch."""
    if os.environ.get("DSGRAPH_FORCE_CPU") == "1":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def worker_environment(procs: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the launcher passes to every worker."""
    env = dict(os.environ if base is None else base)
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
        # DeepSpeed JIT-builds its CPU comm op once per environment; two virtualenvs sharing the
        # default cache rebuild it on every run, so each environment gets its own folder.
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / ".torch_extensions"))
    env.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def inside_launcher() -> bool:
    """True when torchrun, `accelerate launch` or `deepspeed` started this process as a rank."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and "DSGRAPH_DRIVER" not in os.environ


def prepare_current_process() -> None:
    """For a rank started by an external launcher: the same settings the driver would give."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for key, value in worker_environment(world).items():
        os.environ.setdefault(key, value)
