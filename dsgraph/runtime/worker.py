"""One rank: `python -m dsgraph.runtime.worker RUN_DIR --run-id ID [--driver PID] [--resume MANIFEST]`,
started by the launcher.

Reads RUN_DIR/plan.json, runs it, exports the trained models, and leaves RUN_DIR/done/rankN.
A failure is written to RUN_DIR/failures/rankN.json (the plan step, the .dsg line, the cause) and
the process exits at once, so that the launcher stops the other ranks instead of leaving them
waiting in a collective."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from dsgraph.plan import Plan, PlanError, lint
from dsgraph.runtime import control, rundir
from dsgraph.runtime.metrics import Metrics

EXIT_FAILED = 1
RECORD_BYTES = 16384  # the space of a failure record, reserved at start


def _quiet() -> None:
    """Libraries talk a lot at start-up; the run's own output is the progress bar and summary."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import logging

    for name in ("DeepSpeed", "accelerate", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Loading/saving bars would break dsgraph's own. Transformers reads this as it is imported
    # (only when a pipeline has a Hugging Face model: not imported here, ~1 s of a start).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run(run_dir: Path, run_id: str, driver: int | None, resume: Path | None) -> int:
    """One rank of run `run_id`. `driver`: the pid of the `dsgraph run` that started it (the rank
    exits when it dies); `resume`: the checkpoint manifest to continue from, checked by the driver."""
    if driver is not None:
        control.exit_when_gone(driver)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        # Held for the life of this process: no other run can take the directory meanwhile.
        locks = [rundir.hold_shared(run_dir, rundir.WORKERS_LOCK)]
        if driver is None:  # started by an external launcher: refuse a directory a driver owns
            locks.append(rundir.hold_shared(run_dir, rundir.DRIVER_LOCK))
        _reserve_failure_record(run_dir, rank)
        plan = Plan.from_json((run_dir / "plan.json").read_text(encoding="utf-8"))
        problems = lint(plan)
        if problems:
            raise PlanError(f"the plan does not hold together: {'; '.join(problems)}")
    except (OSError, PlanError, rundir.EnvironmentFault) as error:
        _report_failure(run_dir, rank, run_id, error, where="loading the plan")
        os._exit(EXIT_FAILED)
    _quiet()
    started = time.perf_counter()
    from dsgraph.runtime.executor import Executor  # imports torch and deepspeed

    phase = "setup"  # where an error outside the plan's steps happened
    try:
        executor = Executor(plan, run_dir, rank, world, run_id, resume)
        executor.setup()
        setup_time = time.perf_counter() - started
        phase = "the precompute"
        executor.precompute()
        precompute_time = time.perf_counter() - started - setup_time
        phase = "training"
        metrics = executor.train()
        phase = "the export"
        executor.heartbeat.beat(control.EXPORT, executor.last_step)  # watched: a hang here ends the run
        exported = [] if executor.stopped_early else executor.export()
        phase = "the report"
        executor.write_rank_report()
        executor.heartbeat.beat(control.FINISHED, executor.last_step)
        train_time = time.perf_counter() - started - setup_time - precompute_time
        times = {"setup": setup_time, "precompute": precompute_time, "train": train_time}
        metrics.close(_summary(plan, executor.last_step, metrics, exported, times, run_dir))
        executor.backend.shutdown()
        (run_dir / "done").mkdir(exist_ok=True)
        outcome = "stopped" if executor.stopped_early else "ok"
        rundir.write_new(run_dir / "done" / f"rank{rank}", f"{outcome} {run_id}\n")
    except BaseException as error:
        _report_failure(run_dir, rank, run_id, error, phase=phase)
        trackers = getattr(locals().get("executor"), "metrics", None)
        if trackers is not None and trackers.trackers is not None:
            trackers.trackers.close(failed=True)  # the tracker's run ends FAILED, its files whole
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_FAILED)  # no clean-up that could wait on the other ranks
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and the process group is gone. Skipping the interpreter's teardown
    # avoids a rare abort in a C++ destructor of a communication library at exit.
    os._exit(0)


def _report_failure(
    run_dir: Path, rank: int, run_id: str, error: BaseException, where: str | None = None, phase: str = "setup"
) -> None:
    """failures/rankN.json for the driver; when even that cannot be written (a full disk), the
    same line on stderr, which the driver passes through. `where`: a failure before the plan is
    running; `phase`: where the run was when an error outside the plan's steps happened."""
    from dsgraph.runtime.executor import RunFailure

    cause: OSError | None  # the machine's fault behind the error, if it is one
    if isinstance(error, RunFailure):  # in a plan step: only an OSError of the machine
        cause = error.cause if isinstance(error.cause, OSError) and rundir.is_environment_error(error.cause) else None
    else:
        cause = rundir.environment_cause(error, run_dir)
    record: dict[str, Any]
    if isinstance(error, RunFailure):
        record = {"rank": rank, **error.to_json()}
    elif isinstance(error, KeyboardInterrupt):
        record = {"rank": rank, "where": "interrupted", "span": None, "error": "KeyboardInterrupt"}
    elif where is not None:
        record = {"rank": rank, "where": where, "span": None, "error": str(error)}
    else:
        record = {"rank": rank, "where": "dsgraph runtime", "span": None, "error": f"{type(error).__name__}: {error}"}
        record["internal"] = cause is None
    if cause is not None:  # a full disk, a read-only file system
        record["environment"] = True
        record["error"] = rundir.describe(cause, run_dir)
        if record["where"] == "dsgraph runtime":
            record["where"] = phase
        record.pop("internal", None)
    record.update(run_id=run_id, traceback=traceback.format_exc(), time=time.time())  # the first is the cause
    text = json.dumps(record, indent=2) + "\n"
    if len(text.encode()) > RECORD_BYTES:  # the traceback's end is what tells most
        record["traceback"] = record["traceback"][-(RECORD_BYTES // 2) :]
        text = json.dumps(record) + "\n"
    try:
        # Written over the space reserved at start: it needs no new block on a full disk.
        with rundir.open_existing(run_dir / "failures" / f"rank{rank}.json") as file:
            data = text.encode()[:RECORD_BYTES]
            file.write(data)
            file.truncate(len(data))
    except OSError:
        print(f"dsgraph: rank {rank} failed in {record['where']}: {record['error']}", file=sys.stderr)


def _reserve_failure_record(run_dir: Path, rank: int) -> None:
    """failures/rankN.json, blank: the space a failure record needs, taken while there is some.
    The driver ignores a blank record."""
    (run_dir / "failures").mkdir(exist_ok=True)
    with rundir.open_new(run_dir / "failures" / f"rank{rank}.json") as file:
        file.write(b" " * RECORD_BYTES)
        file.flush()
        os.fsync(file.fileno())


def _summary(
    plan: Plan, steps: int, metrics: Metrics, exported: list[Path], seconds: dict[str, float], run_dir: Path
) -> list[str]:
    last, evaluated = metrics.last, metrics.last_eval
    stopped = "" if steps == plan.settings.steps or plan.settings.steps is None else " (stopped early)"
    train = seconds["train"]
    times = f"setup {seconds['setup']:.1f} s"
    times += f", precompute {seconds['precompute']:.1f} s" if plan.precompute else ""
    times += f", evaluation {metrics.eval_seconds:.1f} s" if evaluated else ""
    if last:
        rate = f"{last.get('samples_per_s', 0):.0f} samples/s"
        took = train - metrics.eval_seconds
        lines = [f"done: {plan.pipeline}, {steps} steps{stopped} in {took:.1f} s ({times}), {rate}"]
    else:  # resumed at its last step
        lines = [f"done: {plan.pipeline}, {steps} steps, none left to run ({times})"]
    for name, value in last.get("losses", {}).items():
        lines.append(f"  loss {name:<12} {value:.6f}   (step {last['step']})")
    for name, value in last.get("stats", {}).items():  # e.g. dpo's reward margin and accuracy
        lines.append(f"  stat {name}  {value:.6f}   (step {last['step']})")
    where = f"(eval, step {evaluated.get('step')}, {evaluated.get('samples')} samples)"
    for name, value in evaluated.get("losses", {}).items():
        lines.append(f"  eval {name:<12} {value:.6f}   {where}")
    for name, value in evaluated.get("stats", {}).items():
        lines.append(f"  eval {name}  {value:.6f}   {where}")
    for path in exported:
        lines.append(f"  model {path.name:<11} -> {path}")
    lines.append(f"  metrics      -> {run_dir / 'metrics.jsonl'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsgraph.runtime.worker", description="one rank of a dsgraph run")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--driver", type=int, default=None, help="the pid of the `dsgraph run` that started it")
    parser.add_argument("--resume", type=Path, default=None, help="the checkpoint manifest to continue from")
    args = parser.parse_args(argv)
    return run(args.run_dir, args.run_id, args.driver, args.resume)


if __name__ == "__main__":
    raise SystemExit(main())
