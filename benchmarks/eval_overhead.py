"""Evaluation against training time: `pipelines/distill.dsg` run with its eval set (an evaluation
of 1000 samples every --eval-every steps and at the end) and without it, 2 processes each.

    .venv/bin/python benchmarks/eval_overhead.py [--rounds 2] [--steps 300] [--eval-every 50]

Each round launches both, the order swapped every round (ABBA), so that a drift in the machine's
load falls on both alike. Reported per variant: rank 0's per-step wall time (DSGRAPH_STEP_TIMES=1:
evaluations are left out of it, the question being whether they slow the steps around them), the
number of evaluations and their seconds (from metrics.jsonl), and the wall time of the launch."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipelines" / "distill.dsg"


def variants(folder: Path, eval_every: int) -> dict[str, Path]:
    """distill.dsg as shipped (with its eval set), and without the eval set."""
    shutil.copytree(ROOT / "pipelines" / "configs", folder / "configs")
    text = PIPELINE.read_text(encoding="utf-8").replace("eval_every = 100", f"eval_every = {eval_every}")
    (folder / "with_eval.dsg").write_text(text, encoding="utf-8")
    plain = text.replace("{ eval = val }", "").replace(f"eval_every = {eval_every}", "")
    (folder / "without_eval.dsg").write_text(plain, encoding="utf-8")
    return {"with eval": folder / "with_eval.dsg", "without eval": folder / "without_eval.dsg"}


def launch(pipeline: Path, run_dir: Path, steps: int) -> dict[str, float]:
    command = [sys.executable, "-m", "dsgraph", "run", str(pipeline), "--procs", "2", "--run-dir", str(run_dir)]
    command += ["--set", f"steps={steps}"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, DSGRAPH_STEP_TIMES="1"), capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{pipeline.name}: exit {done.returncode}\n{done.stderr.decode()[-2000:]}")
    steps_s = json.loads((run_dir / "step_times.json").read_text())["step_seconds"][5:]  # the first are warm-up
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_s"] for r in rows if r["split"] == "eval"]
    return {
        "median_ms": statistics.median(steps_s) * 1000,
        "mean_ms": statistics.fmean(steps_s) * 1000,
        "evaluations": len(evals),
        "eval_s": sum(evals),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pipelines = variants(folder, args.eval_every)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
        for round_ in range(args.rounds):
            order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
            for name in order:
                run_dir = folder / f"{name.replace(' ', '_')}-{round_}"
                results[name].append(launch(pipelines[name], run_dir, args.steps))
                print(f"round {round_ + 1}: {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(f"distill.dsg, {args.steps} steps, 2 processes, {args.rounds} rounds (ABBA); per-step times of rank 0")
    print(f"{'':<14}{'median ms':>10}{'mean ms':>10}{'evals':>7}{'eval s':>8}{'wall s':>8}")
    for name, runs in results.items():

        def mid(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        print(
            f"{name:<14}{mid('median_ms'):>10.2f}{mid('mean_ms'):>10.2f}{mid('evaluations'):>7.0f}"
            f"{mid('eval_s'):>8.2f}{mid('wall_s'):>8.1f}"
        )


if __name__ == "__main__":
    main()
