"""dsgraph's training loop against the hand-written loop on the same engines, in one launch.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/loop_overhead.py \
        [--chunks 20] [--chunk-steps 50] [--out FILE]

On a shared 2-core machine the per-step median of a whole launch varies by about 10 % from one
launch to the next, more than the 2 % target of issue 3, so benchmarks/overhead.py cannot resolve
it alone. This script sets pipelines/distill.dsg up once with dsgraph's Executor, then alternates
chunks of Executor.train() with chunks of the loop of benchmarks/accelerate_distill.py written
out on the same Accelerator, engines and data stream. Both loops' step times are split into time
inside the libraries (engine forward, accelerator.backward, the optimizer/scheduler wrappers, the
loss functions, the data loader, all_reduce; the same wrappers time both loops) and the loop's
own Python. The difference of the latter is dsgraph's per-step overhead, free of launch noise;
the time each of dsgraph's per-step helpers takes (in the loop, caches cold) is listed too."""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsgraph.runtime.env import worker_environment  # noqa: E402

os.environ.update(worker_environment(int(os.environ.get("WORLD_SIZE", "1"))))
os.environ["DSGRAPH_STEP_TIMES"] = "1"  # Metrics records dsgraph's step times

import torch  # noqa: E402

import dsgraph.runtime.builtins as builtins  # noqa: E402
import dsgraph.runtime.data as data_module  # noqa: E402
import dsgraph.runtime.executor as executor_module  # noqa: E402
from dsgraph.compiler import compile_file  # noqa: E402
from dsgraph.runtime import control, engines, meter, metrics  # noqa: E402

LOG_EVERY = 10
ACTIVE = ["hand"]  # which loop is running
LIBRARY = {"dsgraph": 0.0, "hand": 0.0}  # seconds inside library calls, per loop
HELPERS: dict[str, float] = {}  # dsgraph helpers, library time excluded
_depth = [0]


def library(fn):
    """Times the outermost library call (a collective inside backward is not counted twice)."""

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        if _depth[0]:
            return fn(*args, **kwargs)
        _depth[0] += 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            LIBRARY[ACTIVE[0]] += time.perf_counter() - start
            _depth[0] -= 1

    return timed


def helper(name: str, fn):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        inside, start = LIBRARY[ACTIVE[0]], time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            HELPERS[name] = HELPERS.get(name, 0.0) + time.perf_counter() - start - (LIBRARY[ACTIVE[0]] - inside)

    return timed


def time_helpers() -> None:
    """Wraps dsgraph's per-step helpers to time each."""
    metrics.Metrics.advance = helper("Metrics.advance (progress bar)", metrics.Metrics.advance)
    metrics.Metrics.log = helper("Metrics.log (every 10th step)", metrics.Metrics.log)
    control.Heartbeat.stop_step = helper("Heartbeat.stop_step (a stop requested?)", control.Heartbeat.stop_step)
    control.Heartbeat.beat = helper("Heartbeat.beat", control.Heartbeat.beat)
    executor_module.evaluate = helper("evaluate (model-call arguments, loss terms)", executor_module.evaluate)
    executor_module._to_device = helper("_to_device", executor_module._to_device)
    for name in ("start", "add", "means"):
        setattr(meter.Meter, name, helper(f"Meter.{name}", getattr(meter.Meter, name)))
    for name in ("accumulate", "forward", "backward", "optimizer_step", "all_reduce_mean", "learning_rate"):
        setattr(engines.Backend, name, helper(f"Backend.{name}", getattr(engines.Backend, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20, help="chunks of each loop, alternated")
    parser.add_argument("--chunk-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None, help="JSON with every step time (rank 0)")
    parser.add_argument("--helpers", action="store_true", help="also time each of dsgraph's per-step helpers")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    plan = compile_file(str(ROOT / "pipelines" / "distill.dsg"), world).plan
    assert plan is not None
    run_dir = Path(tempfile.mkdtemp(prefix=f"dsgraph-loop-rank{rank}-"))  # metrics, heartbeat
    executor = executor_module.Executor(plan, run_dir, rank, world, "0" * 16)
    executor.setup()
    backend = executor.backend
    accelerator = backend.accelerators[0]
    student, teacher = backend.models["student"], backend.models["teacher"]
    model, frozen, optimizer, scheduler = student.engine, teacher.engine, student.optimizer, student.scheduler
    batches = executor.batches["train"]

    # The same wrappers time the library calls of both loops.
    engine_class = type(model)
    engine_class.__call__ = library(engine_class.__call__)
    accelerator.backward = library(accelerator.backward)
    optimizer.step, optimizer.zero_grad = library(optimizer.step), library(optimizer.zero_grad)
    scheduler.step = library(scheduler.step)
    kl, ce = library(builtins.kl), library(builtins.ce)
    builtins.LOSSES["kl"], builtins.LOSSES["ce"] = kl, ce
    data_module.Batches.next = library(data_module.Batches.next)
    torch.distributed.all_reduce = library(torch.distributed.all_reduce)
    if args.helpers:  # their wrappers cost ~1 us a call, counted in dsgraph's own code
        time_helpers()

    def hand_loop(first: int, last: int) -> list[float]:
        """The loop of benchmarks/accelerate_distill.py."""
        times, tick = [], time.perf_counter()
        for step in range(first, last + 1):
            batch = batches.next()
            x, y = batch["x"], batch["y"]
            with accelerator.accumulate(model):
                logits = model(x)
                with torch.no_grad():
                    teacher_logits = frozen(x)
                loss = 0.5 * kl(logits, teacher_logits, temperature=2.0) + 0.5 * ce(logits, y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            loss.item()
            if step % LOG_EVERY == 0 or step == last:  # dsgraph logs a chunk's last step too
                accelerator.reduce(loss.detach(), reduction="mean").item()
            now = time.perf_counter()
            times.append(now - tick)
            tick = now
        return times

    times: dict[str, list[list[float]]] = {"dsgraph": [], "hand": []}
    step = 0
    for chunk in range(args.chunks):
        for which in ("dsgraph", "hand") if chunk % 2 == 0 else ("hand", "dsgraph"):
            ACTIVE[0] = which
            if which == "dsgraph":
                executor.first_step, executor._total_steps = step, step + args.chunk_steps  # one chunk
                record = executor.train()
                if record.bar is not None:
                    record.bar.close()
                if record.file is not None:
                    record.file.close()
                if rank == 0:
                    times["dsgraph"].append(record.step_times)
            else:
                chunk_times = hand_loop(step + 1, step + args.chunk_steps)
                if rank == 0:
                    times["hand"].append(chunk_times)
            step += args.chunk_steps

    if rank == 0:
        report(times, args)
    backend.shutdown()
    os._exit(0)


def report(times: dict[str, list[list[float]]], args) -> None:
    flat = {k: [t for chunk in v for t in chunk] for k, v in times.items()}
    n = {k: len(v) for k, v in flat.items()}
    mean = {k: statistics.fmean(v) for k, v in flat.items()}
    inside = {k: LIBRARY[k] / n[k] for k in flat}
    own = {k: mean[k] - inside[k] for k in flat}
    pairs = [statistics.median(a) / statistics.median(b) for a, b in zip(times["dsgraph"], times["hand"], strict=True)]
    print(f"\n{args.chunks} chunks x {args.chunk_steps} steps of each loop, alternated, same engines (rank 0):")
    print("| loop | per-step median (ms) | per-step mean (ms) | in libraries (us/step) | own code (us/step) |")
    print("|---|---|---|---|---|")
    for k, label in (("dsgraph", "dsgraph Executor.train"), ("hand", "hand-written")):
        print(
            f"| {label} | {statistics.median(flat[k]) * 1e3:.2f} | {mean[k] * 1e3:.2f} | "
            f"{inside[k] * 1e6:.0f} | {own[k] * 1e6:.0f} |"
        )
    extra = own["dsgraph"] - own["hand"]
    ratio = statistics.median(flat["dsgraph"]) / statistics.median(flat["hand"])
    print(
        f"\ndsgraph's own code costs {extra * 1e6:.0f} us more per step: {extra / mean['hand'] * 100:.2f} % "
        f"of the hand-written step; median ratio of the step times {ratio:.4f}, "
        f"median of per-chunk-pair ratios {statistics.median(pairs):.4f}"
    )
    if HELPERS:
        print("\ndsgraph helpers, per step (library time excluded; nested helpers are included in their callers):")
    for name, seconds in sorted(HELPERS.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds / n['dsgraph'] * 1e6:7.1f} us  {name}")
    if args.out is not None:
        args.out.write_text(json.dumps({"times": times, "library_s": LIBRARY, "helpers_s": HELPERS}) + "\n")


if __name__ == "__main__":
    main()
