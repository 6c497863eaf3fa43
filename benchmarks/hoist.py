"""A frozen teacher hoisted out of the loop against the same teacher live: whole-run wall time.

    .venv/bin/python benchmarks/hoist.py [--rounds 2] [--epochs 30]

The distillation: a ZeRO-3 teacher mlp(64 -> 1536 x 3 -> 16), 4.8 M parameters, 16x the ZeRO-2
student's (64 -> 512 x 2 -> 16, 0.30 M), on 2048 samples, micro batch 32 per process, 2 processes:
32 steps per epoch, `--epochs` passes over the data. The same pipeline is launched live and with
`--set teacher.cache=true` (`dsgraph run --procs 2`, a fresh run directory each time, so the cached
run computes its cache: the precompute is in its time), alternating which goes first (ABBA).
Reported: each launch's whole wall time (the `dsgraph run` process, start to exit), rank 0's steps
per second (DSGRAPH_STEP_TIMES=1), the precompute's seconds, the ratio of the median wall times,
and the cache's bytes per sample, and per token for a language model's top-k (k = 16, 64) against
its whole logits. The last line is `hoist speedup X.XX`."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLES, MICRO_BATCH, WORLD = 2048, 32, 2

PIPELINE = """pipeline hoist_bench {{
    seed = 0
    steps = {steps}
    micro_batch = {micro_batch}
    log_every = 50
    data train = builtin.synthetic_classification(samples={samples}, features=64, classes=16)
    model teacher = builtin.mlp(inputs=64, hidden=[1536, 1536, 1536], outputs=16) {{
        zero = {{ stage = 3  stage3_param_persistence_threshold = 0 }}
        frozen
    }}
    model student = builtin.mlp(inputs=64, hidden=[512, 512], outputs=16) {{
        zero = {{ stage = 2 }}
        optimizer = adamw(lr=1e-3)
    }}
    loss kd = 0.5 * kl(student(train.x), teacher(train.x), temperature=2.0) + 0.5 * ce(student(train.x), train.y)
    train student on kd
}}
"""


def launch(pipeline: Path, run_dir: Path, cached: bool) -> dict[str, float]:
    command = [sys.executable, "-m", "dsgraph", "run", str(pipeline), "--procs", str(WORLD), "--run-dir", str(run_dir)]
    if cached:
        command += ["--set", "teacher.cache=true"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, DSGRAPH_STEP_TIMES="1"), capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{'cached' if cached else 'live'}: exit {done.returncode}\n{done.stderr.decode()[-3000:]}")
    steps = json.loads((run_dir / "step_times.json").read_text())["step_seconds"][5:]  # the first are warm-up
    report = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    return {
        "wall_s": wall,
        "steps_per_s": 1.0 / statistics.median(steps),
        "precompute_s": sum(f["seconds"] for f in report["precompute"]),
    }


def cache_sizes(pipeline: Path) -> list[str]:
    """The bytes the plan states for the benchmark's cache, and a language model's per token."""
    from dsgraph import cachesize
    from dsgraph.compiler import compile_file
    from dsgraph.plan import FillCache, Precision
    from dsgraph.runtime.tokenizer import ByteTokenizer

    plan = compile_file(pipeline, WORLD, ("teacher.cache=true",)).plan
    assert plan is not None and plan.precompute is not None
    fill = next(s for s in plan.precompute.steps if isinstance(s, FillCache))
    assert fill.bytes is not None and fill.rows is not None
    vocab = ByteTokenizer.vocab_size
    lines = [f"cache: {fill.bytes / fill.rows:.0f} bytes per sample (16 fp32 logits), {fill.bytes} bytes in all"]
    for k in (16, 64):
        per_token = cachesize.row_bytes((1, vocab), Precision.FP32, k)
        lines.append(f"cache of a language model, top-{k}: {per_token} bytes per token (fp32 log-prob + int32 id)")
    whole = cachesize.row_bytes((1, vocab), Precision.FP32, None)
    lines.append(f"  against the whole logits: {whole} bytes per token at the byte vocabulary ({vocab}),")
    lines.append(f"  {cachesize.row_bytes((1, 151_936), Precision.BF16, None)} at a 151,936-token vocabulary in bf16")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    steps = args.epochs * SAMPLES // (MICRO_BATCH * WORLD)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipeline = folder / "hoist_bench.dsg"
        pipeline.write_text(PIPELINE.format(steps=steps, micro_batch=MICRO_BATCH, samples=SAMPLES))
        results: dict[str, list[dict[str, float]]] = {"live": [], "cached": []}
        for round_ in range(args.rounds):
            order = ["live", "cached"] if round_ % 2 == 0 else ["cached", "live"]
            for name in order:
                result = launch(pipeline, folder / f"{name}-{round_}", name == "cached")
                results[name].append(result)
                print(f"round {round_ + 1}: {name}: {result}", file=sys.stderr, flush=True)
        sizes = cache_sizes(pipeline)
    print(
        f"distillation, teacher 4.8 M parameters (ZeRO-3) / student 0.30 M (ZeRO-2), {SAMPLES} samples, "
        f"{args.epochs} epochs = {steps} steps, {WORLD} processes, {args.rounds} rounds (ABBA)"
    )
    print(f"{'':<8}{'wall s':>9}{'steps/s':>10}{'precompute s':>14}   (medians; wall: the whole `dsgraph run`)")
    for name, runs in results.items():
        print(
            f"{name:<8}{statistics.median(r['wall_s'] for r in runs):>9.2f}"
            f"{statistics.median(r['steps_per_s'] for r in runs):>10.1f}"
            f"{statistics.median(r['precompute_s'] for r in runs):>14.2f}"
        )
    per_round = [a["wall_s"] / b["wall_s"] for a, b in zip(results["live"], results["cached"], strict=True)]
    print("wall-time ratio per round (live / cached): " + ", ".join(f"{r:.2f}" for r in per_round))
    for line in sizes:
        print(line)
    speedup = statistics.median(r["wall_s"] for r in results["live"]) / statistics.median(
        r["wall_s"] for r in results["cached"]
    )
    print(f"hoist speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
