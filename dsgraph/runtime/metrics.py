"""What a run reports: metrics.jsonl (rank 0), a progress bar (rank 0), a summary at the end.

metrics.jsonl gets one line per logged step, appended with a single write, so that a crash can at
worst leave the last line torn; a resumed run keeps the lines up to its checkpoint and drops a torn
one with a warning, never failing on it.

With DSGRAPH_STEP_TIMES=1, rank 0 also writes step_times.json: the wall time of every step and
the unix time the loop started (benchmarks/overhead.py reads it; one clock read per step)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

from dsgraph.runtime.rundir import write_new
from dsgraph.runtime.trackers import Trackers


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        pipeline: str,
        first_step: int = 0,
        trackers: Trackers | None = None,
        rank_metrics: bool = False,
    ):
        self.rank = rank
        self.trackers = trackers  # rank 0's experiment trackers, beside metrics.jsonl
        self.start = time.perf_counter()
        self.file: BinaryIO | None = None
        if rank == 0:
            path = run_dir / "metrics.jsonl"
            kept = _kept_lines(path, first_step) if first_step else []
            tmp = run_dir / ".metrics.jsonl.tmp"
            write_new(tmp, "".join(line + "\n" for line in kept))
            tmp.replace(path)
            # Unbuffered, appending: each record is one write() of a whole line.
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - written every step, closed in close()
        self.last: dict[str, Any] = {}  # the latest training row
        self.last_eval: dict[str, Any] = {}  # the latest evaluation row
        self.eval_seconds = 0.0
        self._shown: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
        self.bar = None
        if rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=first_step,
                desc=pipeline,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
                disable=None if sys.stderr.isatty() else False,
            )
        self.rank_file: BinaryIO | None = None  # this rank's own (not averaged) losses
        if rank_metrics:
            (run_dir / "ranks").mkdir(exist_ok=True)
            path = run_dir / "ranks" / f"rank{rank}.metrics.jsonl"
            kept = _kept_lines(path, first_step) if first_step else []
            tmp = run_dir / "ranks" / f".rank{rank}.metrics.jsonl.tmp"
            write_new(tmp, "".join(line + "\n" for line in kept))
            tmp.replace(path)
            self.rank_file = open(path, "ab", buffering=0)  # noqa: SIM115 - written every logged step
        self.step_times: list[float] | None = None
        if rank == 0 and os.environ.get("DSGRAPH_STEP_TIMES") == "1":
            self.step_times_path = run_dir / "step_times.json"
            self.step_times, self.loop_start = [], time.time()
            self._tick = time.perf_counter()

    def log(self, record: dict[str, Any]) -> None:
        """A training row (`"split": "train"`) or an evaluation's (`"split": "eval"`)."""
        record["wall_time"] = round(time.perf_counter() - self.start, 4)
        evaluation = record["split"] == "eval"
        if evaluation:
            self.last_eval = record
            self.eval_seconds += record["eval_s"]
        else:
            self.last = record
        if self.file is not None:
            try:
                self.file.write((json.dumps(record, sort_keys=True) + "\n").encode())
            except OSError as error:  # a full disk: name the file
                error.filename = error.filename or self.file.name
                raise
        if self.trackers is not None:
            self.trackers.log(tracked(record), record["step"])
        if self.bar is not None:  # the latest training figures, then the latest evaluation's
            prefix = "eval_" if evaluation else ""
            shown = {prefix + k: f"{v:.4f}" for k, v in record["losses"].items()}
            shown.update({prefix + k.rpartition(".")[2]: f"{v:.4f}" for k, v in record.get("stats", {}).items()})
            if not evaluation:
                shown["samples/s"] = f"{record['samples_per_s']:.0f}"
            self._shown[record["split"]] = shown
            self.bar.set_postfix({**self._shown["train"], **self._shown["eval"]}, refresh=evaluation)

    def log_rank(self, record: dict[str, Any]) -> None:
        """This rank's own losses, terms and stats of a logged step (before the mean over ranks)."""
        if self.rank_file is not None:
            try:
                self.rank_file.write((json.dumps(record, sort_keys=True) + "\n").encode())
            except OSError as error:
                error.filename = error.filename or self.rank_file.name
                raise

    def exclude(self, seconds: float) -> None:
        """Time spent outside training steps (an evaluation): left out of the step times."""
        if self.step_times is not None:
            self._tick += seconds

    def advance(self, steps: int = 1) -> None:
        if self.step_times is not None:  # the end of a step: everything since the last one
            now = time.perf_counter()
            self.step_times.append(now - self._tick)
            self._tick = now
        if self.bar is not None:
            self.bar.update(steps)

    def close(self, summary_lines: list[str]) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.rank_file is not None:
            self.rank_file.close()
        if self.trackers is not None:
            self.trackers.close()
        if self.step_times is not None:
            write_new(
                self.step_times_path,
                json.dumps({"loop_start_unix": self.loop_start, "step_seconds": self.step_times}) + "\n",
            )
        if self.rank == 0:
            print("\n".join(summary_lines), flush=True)


def tracked(record: dict[str, Any]) -> dict[str, float]:
    """A metrics row as tracker values: `train/kd`, `train/kd/kl`, `eval/kd/ce.accuracy`,
    `lr/student`, `perf/samples_per_s`."""
    split = record["split"]
    values = {f"{split}/{name}": value for part in ("losses", "terms", "stats") for name, value in record[part].items()}
    values.update({f"lr/{name}": value for name, value in record.get("lr", {}).items()})
    if "samples_per_s" in record:
        values["perf/samples_per_s"] = record["samples_per_s"]
    return values


def _kept_lines(path: Path, first_step: int) -> list[str]:
    """The lines of a resumed run's metrics.jsonl up to its checkpoint's step. A line that is not a
    whole record (torn by a crash while it was written) is dropped with a warning."""
    if not path.exists():
        return []
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            print(f"dsgraph: {path}:{number}: not a whole record (torn by a crash?); dropped", file=sys.stderr)
            continue
        if isinstance(step, int) and step <= first_step:
            kept.append(line)
    return kept
