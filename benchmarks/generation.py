"""ZeRO-3 generation with the weights gathered once against layer by layer: tokens per second.

    .venv/bin/python benchmarks/generation.py [--rounds 2] [--steps 8] [--layers 4] [--embd 128]

The policy: a GPT-2 (byte vocabulary, 259 ids; `--layers` blocks of width `--embd`, 4 heads)
written by this script into a temporary folder, trained by GRPO under ZeRO-3 with every
parameter partitioned (`stage3_param_persistence_threshold = 0`), 2 processes. Each step, each
process samples 8 completions of 16 new tokens for each of its 8 prompts (64 completions;
`pipelines/data/sums.jsonl`, the prompts 8 tokens long), scores them with `builtin.sums()` and
trains on `grpo(...)` (beta 0, no reference). The same pipeline is launched with `gather = once`
(DeepSpeed's `unwrap_model_for_generation`: one all-gather of every parameter per generation)
and with `gather = layers` (each forward gathers each layer again, for every new token), each
with `dsgraph run --procs 2` into a fresh run directory, alternating which goes first (ABBA).
Reported: each launch's generation tokens per second (the completions' tokens of both ranks over
the slower rank's generation seconds, from `RUN_DIR/ranks/rankN.json`, "generated"), its
tokens, its wall time, the cores other processes used meanwhile (from /proc/stat) and the ratio
per round. The last line is `generation speedup X.XX (gathered once vs layer by layer)`: the
ratio of the median tokens per second.

Then (unless `--no-grpo`) `pipelines/grpo.dsg` as shipped (60 steps; a ZeRO-2 policy, so nothing
to gather while generating, and a ZeRO-3 reference), `--procs 2`, from `pipelines/`: the seconds
per step rank 0 spent generating, scoring (the reward and the reference's forward) and training
(`metrics.jsonl`'s train rows' "phase_s"), the mean over the logged rows after the first."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
WORLD, MICRO_BATCH, SAMPLES, NEW_TOKENS = 2, 8, 8, 16
MODES = ("once", "layers")

PIPELINE = """pipeline generation_bench {{
    seed = 0
    steps = {steps}
    micro_batch = {micro_batch}
    log_every = 1

    data prompts = builtin.prompts(path="{data}", tokenizer="bytes", max_length=8)

    model policy = hf("{model}") {{
        zero = {{ stage = 3  stage3_param_persistence_threshold = 0 }}
        optimizer = adamw(lr=1e-4, weight_decay=0.0)
    }}

    generate rollouts = policy(prompts) {{
        samples = {samples}
        max_new_tokens = {new_tokens}
        temperature = 1.0
        gather = {gather}
    }}

    reward correct = builtin.sums()

    loss objective = grpo(
        policy(rollouts.input_ids, attention_mask=rollouts.attention_mask).logits,
        rollouts, correct(rollouts), beta=0.0)

    train policy on objective
}}
"""


def write_model(folder: Path, layers: int, embd: int, heads: int) -> int:
    """A GPT-2 on dsgraph's byte vocabulary, saved with save_pretrained; returns its parameters."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=259,
        n_positions=64,
        bos_token_id=257,
        eos_token_id=258,
        pad_token_id=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        n_embd=embd,
        n_layer=layers,
        n_head=heads,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all but idle and iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def launch(pipeline: Path, run_dir: Path, cwd: Path) -> dict[str, float]:
    """One `dsgraph run`: its wall time, and the cores other processes used meanwhile."""
    command = [sys.executable, "-m", "dsgraph", "run", str(pipeline), "--procs", str(WORLD), "--run-dir", str(run_dir)]
    busy, ours = _busy_cpu_s(), _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{pipeline.name}: exit {done.returncode}\n{done.stderr.decode()[-3000:]}")
    others = (_busy_cpu_s() - busy) - (_children_cpu_s() - ours)
    return {"wall_s": wall, "other_cores": max(0.0, others / wall)}


def generation_figures(run_dir: Path) -> dict[str, float]:
    """Tokens per second of the run's generation: both ranks' tokens over the slower rank's seconds
    (the ranks generate in step: every new token is a sync point)."""
    reports = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    ranks = [report["generated"]["rollouts"] for report in reports]
    tokens = sum(g["tokens"] for g in ranks)
    seconds = max(g["seconds"] for g in ranks)
    return {
        "tokens": tokens,
        "completions": sum(g["completions"] for g in ranks),
        "calls": ranks[0]["calls"],
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "rank0_tokens_per_s": ranks[0]["tokens"] / ranks[0]["seconds"],
    }


def grpo_phases(folder: Path) -> tuple[dict[str, float], int, float]:
    """`pipelines/grpo.dsg` as shipped: rank 0's mean seconds per step in each phase over the
    logged train rows after the first, the rows averaged, and the whole run's wall time."""
    run_dir = folder / "grpo"
    wall = launch(PIPELINES / "grpo.dsg", run_dir, PIPELINES)["wall_s"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phases = [r["phase_s"] for r in rows if "phase_s" in r][1:]
    if not phases:
        raise SystemExit(f"{run_dir / 'metrics.jsonl'}: no train rows with phase_s after the first")
    means = {name: statistics.mean(p[name] for p in phases) for name in phases[0]}
    return means, len(phases), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per launch (one generation each)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--no-grpo", action="store_true", help="skip the phase times of pipelines/grpo.dsg")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameters = write_model(folder / "policy", args.layers, args.embd, args.heads)
        pipelines = {}
        for mode in MODES:
            pipelines[mode] = folder / f"generation_{mode}.dsg"
            pipelines[mode].write_text(
                PIPELINE.format(
                    steps=args.steps,
                    micro_batch=MICRO_BATCH,
                    data=PIPELINES / "data" / "sums.jsonl",
                    model=folder / "policy",
                    samples=SAMPLES,
                    new_tokens=NEW_TOKENS,
                    gather=mode,
                )
            )
        results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                run_dir = folder / f"{mode}-{round_}"
                launch_figures = launch(pipelines[mode], run_dir, folder)
                result = {**generation_figures(run_dir), **launch_figures}
                results[mode].append(result)
                print(f"round {round_ + 1}: {mode}: {result}", file=sys.stderr, flush=True)
        phases = None if args.no_grpo else grpo_phases(folder)

    print(
        f"ZeRO-3 generation, GPT-2 {args.layers} layers x {args.embd} ({parameters / 1e6:.2f} M parameters, "
        f"all partitioned), {WORLD} processes, {MICRO_BATCH} prompts x {SAMPLES} samples x {NEW_TOKENS} new tokens "
        f"per process and step, {args.steps} steps per launch, {args.rounds} rounds (ABBA)"
    )
    print(
        f"{'round':<7}{'gather':<8}{'tokens':>8}{'gen s':>9}{'tokens/s':>10}{'rank 0 tok/s':>14}"
        f"{'wall s':>9}{'other cores':>13}"
    )
    for round_ in range(args.rounds):
        for mode in MODES:
            r = results[mode][round_]
            print(
                f"{round_ + 1:<7}{mode:<8}{r['tokens']:>8.0f}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.1f}"
                f"{r['rank0_tokens_per_s']:>14.1f}{r['wall_s']:>9.2f}{r['other_cores']:>13.2f}"
            )
    per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(results["once"], results["layers"], strict=True)]
    print("tokens/s ratio per round (once / layers): " + ", ".join(f"{r:.2f}" for r in per_round))
    if phases is not None:
        means, rows, wall = phases
        total = sum(means.values())
        print(
            f"pipelines/grpo.dsg, {WORLD} processes: seconds per step (rank 0, mean of {rows} logged rows "
            f"after the first; whole run {wall:.1f} s): "
            + "  ".join(f"{name} {seconds:.4f} ({seconds / total:.0%})" for name, seconds in means.items())
            + f"  step {total:.4f}"
        )
    speedup = statistics.median(r["tokens_per_s"] for r in results["once"]) / statistics.median(
        r["tokens_per_s"] for r in results["layers"]
    )
    print(f"generation speedup {speedup:.2f} (gathered once vs layer by layer)")


if __name__ == "__main__":
    main()
