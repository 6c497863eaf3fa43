"""One rank: `python -m dsgraph.runtime.worker RUN_DIR`, started by the launcher.

Reads RUN_DIR/plan.json, runs it, exports the trained models, and leaves RUN_DIR/done/rankN.
A failure is written to RUN_DIR/failures/rankN.json (the plan step, the .dsg line, the cause) and
the process exits at once, so that the launcher stops the other ranks instead of leaving them
waiting in a collective."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from dsgraph.plan import Plan, PlanError, lint
from dsgraph.runtime import control

EXIT_FAILED = 1


def _quiet() -> None:
    """Libraries talk a lot at start-up; the run's own output is the progress bar and summary."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    for name in ("DeepSpeed", "accelerate", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # loading/saving bars would break dsgraph's own
    except ImportError:
        pass


def run(run_dir: Path) -> int:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    _quiet()
    started = time.perf_counter()
    try:
        plan = Plan.from_json((run_dir / "plan.json").read_text(encoding="utf-8"))
        problems = lint(plan)
        if problems:
            raise PlanError(f"the plan does not hold together: {'; '.join(problems)}")
    except (OSError, PlanError) as error:
        _report_failure(run_dir, rank, RuntimeError(f"{run_dir / 'plan.json'}: {error}"), internal=False)
        os._exit(EXIT_FAILED)
    from dsgraph.runtime.executor import Executor  # imports torch and deepspeed

    executor = Executor(plan, run_dir, rank, world)
    try:
        executor.setup()
        setup_time = time.perf_counter() - started
        metrics = executor.train()
        executor.heartbeat.beat(control.FINISHED, executor.total_steps)  # finished training: no watchdog
        exported = [] if executor.stopped_early else executor.export()
        executor.write_rank_report()
        train_time = time.perf_counter() - started - setup_time
        metrics.close(_summary(plan, executor.last_step, metrics.last, exported, setup_time, train_time, run_dir))
        executor.backend.shutdown()
    except BaseException as error:
        _report_failure(run_dir, rank, error)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)  # no clean-up that could wait on the other ranks
    (run_dir / "done").mkdir(exist_ok=True)
    (run_dir / "done" / f"rank{rank}").write_text("stopped\n" if executor.stopped_early else "ok\n")
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the process group is gone. Skipping the interpreter's teardown
    # avoids a rare abort in a C++ destructor of a communication library at exit.
    os._exit(0)


def _report_failure(run_dir: Path, rank: int, error: BaseException, internal: bool = True) -> None:
    from dsgraph.runtime.executor import RunFailure

    record: dict[str, Any]
    if isinstance(error, RunFailure):
        record = {"rank": rank, **error.to_json()}
    elif isinstance(error, KeyboardInterrupt):
        record = {"rank": rank, "where": "interrupted", "span": None, "error": "KeyboardInterrupt"}
    elif not internal:
        record = {"rank": rank, "where": "loading the plan", "span": None, "error": str(error)}
    else:
        record = {
            "rank": rank,
            "where": "dsgraph runtime",
            "span": None,
            "error": f"{type(error).__name__}: {error}",
            "internal": True,
        }
    record["traceback"] = traceback.format_exc()
    record["time"] = time.time()  # the first failure is the cause; the others follow from it
    (run_dir / "failures").mkdir(exist_ok=True)
    (run_dir / "failures" / f"rank{rank}.json").write_text(json.dumps(record, indent=2) + "\n")


def _summary(
    plan: Plan, steps: int, last: dict[str, Any], exported: list[Path], setup: float, train: float, run_dir: Path
) -> list[str]:
    stopped = "" if steps == plan.settings.steps or plan.settings.steps is None else " (stopped early)"
    lines = [
        f"done: {plan.pipeline}, {steps} steps{stopped} in {train:.1f} s "
        f"(setup {setup:.1f} s), {last.get('samples_per_s', 0):.0f} samples/s"
    ]
    for name, value in last.get("losses", {}).items():
        lines.append(f"  loss {name:<12} {value:.6f}   (step {last['step']})")
    for name, value in last.get("stats", {}).items():  # e.g. dpo's reward margin and accuracy
        lines.append(f"  stat {name}  {value:.6f}   (step {last['step']})")
    for path in exported:
        lines.append(f"  model {path.name:<11} -> {path}")
    lines.append(f"  metrics      -> {run_dir / 'metrics.jsonl'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dsgraph.runtime.worker RUN_DIR", file=sys.stderr)
        return 2
    return run(Path(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
