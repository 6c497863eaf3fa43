"""`dsgraph run`: compile (no torch yet), then start N workers with torch's elastic launcher and
watch them; or, inside an existing launcher, run as that rank.

The driver never waits blindly: it polls the workers' heartbeats, so that a rank stuck in a
collective (DeepSpeed's CPU all-reduce ignores the process-group timeout) ends the run after
`--hang-timeout` seconds; a killed rank ends it as soon as torch's launcher notices. Either way
every worker is gone when `dsgraph run` returns."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

from dsgraph.runtime import control, env

EXIT_OK, EXIT_USER, EXIT_WORKER, EXIT_INTERRUPTED = 0, 1, 4, 130
SETUP_TIMEOUT = 900  # the first run builds DeepSpeed's comm op (~30-50 s on 2 cores)


def default_run_dir(pipeline: str) -> Path:
    return Path("runs") / f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_plan(run_dir: Path, plan_json: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("failures", "done", "heartbeat"):  # a reused run directory starts clean
        for old in (run_dir / sub).glob("rank*") if (run_dir / sub).is_dir() else []:
            old.unlink()
    for stale in ("stop", "agent_failure.json"):
        (run_dir / stale).unlink(missing_ok=True)
    tmp = run_dir / f".plan.json.{os.getpid()}"
    tmp.write_text(plan_json, encoding="utf-8")
    tmp.replace(run_dir / "plan.json")  # atomic: ranks of an external launcher race here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run_dir: Path, procs: int, hang_timeout: float, resume: Path | None = None) -> int:
    """Start `procs` workers on this machine, watch them, and return the dsgraph exit code."""
    command = [
        sys.executable,
        "-m",
        "dsgraph.runtime.agent",
        "--nproc_per_node",
        str(procs),
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "--max_restarts",
        "0",
        "-m",
        "dsgraph.runtime.worker",
        str(run_dir),
    ]
    environment = env.worker_environment(procs)
    environment["DSGRAPH_DRIVER"] = "1"
    environment.setdefault("LOGLEVEL", "CRITICAL")  # the elastic agent's own log lines
    if resume is not None:
        environment["DSGRAPH_RESUME"] = str(resume)
    process = subprocess.Popen(command, env=environment, start_new_session=True)
    signal.signal(signal.SIGTERM, _terminate)  # `kill` of the driver: the same clean stop as Ctrl-C
    try:
        code, hung = _watch(process, run_dir, procs, hang_timeout)
    except KeyboardInterrupt:
        return _interrupt(process, run_dir, procs)
    finally:
        _kill_all(process, run_dir, procs)
    if hung:
        return EXIT_WORKER
    return outcome(run_dir, procs, code)


def _watch(process: subprocess.Popen[bytes], run_dir: Path, procs: int, hang_timeout: float) -> tuple[int, bool]:
    last_progress: dict[int, tuple[tuple[int, int], float]] = {}  # rank -> ((phase, step), when first seen)
    while True:
        try:
            return process.wait(timeout=1.0), False
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        for rank, (phase, step, _, _) in control.read_heartbeats(run_dir, procs).items():
            if phase == control.FINISHED:
                continue
            seen = last_progress.get(rank)
            if seen is None or seen[0] != (phase, step):
                last_progress[rank] = ((phase, step), now)
                continue
            limit = hang_timeout if phase == control.TRAINING else max(hang_timeout, SETUP_TIMEOUT)
            if now - seen[1] > limit:
                where = (
                    f"at step {step + 1} (last completed step {step})" if phase == control.TRAINING else "during setup"
                )
                print(
                    f"dsgraph: rank {rank} made no progress for {now - seen[1]:.0f} s {where}; "
                    "stopping the run (a rank stuck in a collective)",
                    file=sys.stderr,
                )
                _kill_all(process, run_dir, procs)
                return -1, True


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _interrupt(process: subprocess.Popen[bytes], run_dir: Path, procs: int) -> int:
    """Ctrl-C: ask the ranks to stop after a step none has finished (they checkpoint it when
    checkpointing is on); a second Ctrl-C, or 60 s, stops them at once."""
    step = control.request_stop(run_dir, procs)
    print(f"\ndsgraph: stopping after step {step} (Ctrl-C again to stop at once)", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
        process.wait(timeout=60)
    _kill_all(process, run_dir, procs)
    return EXIT_INTERRUPTED


def _kill_all(process: subprocess.Popen[bytes], run_dir: Path, procs: int) -> None:
    """Leave no process behind: the launcher's group, and every worker by the pid its heartbeat
    names (torch's launcher starts workers in sessions of their own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for _, _, _, pid in control.read_heartbeats(run_dir, procs).values():
        if _is_worker_of(pid, run_dir):  # a pid may have been reused: check it is ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _is_worker_of(pid: int, run_dir: Path) -> bool:
    try:
        import psutil

        cmdline = psutil.Process(pid).cmdline()
    except Exception:
        return False
    return "dsgraph.runtime.worker" in cmdline and str(run_dir) in cmdline


def last_completed_step(run_dir: Path, procs: int) -> int:
    beats = control.read_heartbeats(run_dir, procs)
    return min((b[1] for b in beats.values()), default=0)


def outcome(run_dir: Path, procs: int, launcher_code: int) -> int:
    """Success is every rank's done marker (a rare abort in a library's exit handler after all
    work is done must not fail a finished run); otherwise the first failure is reported."""
    done = len(list((run_dir / "done").glob("rank*"))) if (run_dir / "done").is_dir() else 0
    if done == procs:
        return EXIT_OK
    failures = sorted((run_dir / "failures").glob("rank*.json")) if (run_dir / "failures").is_dir() else []
    agent = run_dir / "agent_failure.json"
    exits = json.loads(agent.read_text()) if agent.exists() else []
    silent = [
        e
        for e in exits
        if not (run_dir / "failures" / f"rank{e['rank']}.json").exists() and (e["signal"] or e["exitcode"] != 1)
    ]
    if failures:  # the agent SIGTERMs the survivors of a reported failure: not a cause
        silent = [e for e in silent if e["signal"] != "SIGTERM"]
    if silent:
        # A rank that went without a report was killed (or crashed hard); what the others then
        # reported (a closed connection in a collective) follows from it.
        died = min(silent, key=lambda e: (e["signal"] == "SIGTERM", e["rank"]))  # the agent SIGTERMs survivors
        step = last_completed_step(run_dir, procs)
        how = f"was killed by {died['signal']}" if died.get("signal") else f"exited with code {died['exitcode']}"
        print(f"dsgraph: rank {died['rank']} {how}; last completed step {step}", file=sys.stderr)
        return EXIT_WORKER
    if failures:
        records = sorted((json.loads(f.read_text()) for f in failures), key=lambda r: r.get("time", 0))
        record = records[0]
        span = record.get("span")
        where = f"{span['file']}:{span['line']}:{span['col']}: " if span else ""
        print(f"{where}error: rank {record['rank']} failed in {record['where']}\n  {record['error']}", file=sys.stderr)
        if record.get("internal"):
            print(record.get("traceback", ""), file=sys.stderr)
        others = len(failures) - 1
        if others:
            print(f"  ({others} other rank(s) failed too; see {run_dir / 'failures'})", file=sys.stderr)
        return EXIT_USER if not record.get("internal") else EXIT_WORKER
    step = last_completed_step(run_dir, procs)
    print(
        f"dsgraph: the workers stopped without a report (launcher exit code {launcher_code}); "
        f"{done} of {procs} ranks finished; last completed step {step}",
        file=sys.stderr,
    )
    return EXIT_WORKER


def run_here(run_dir: Path, resume: Path | None = None) -> int:
    """Inside torchrun / accelerate launch / deepspeed: this process is one rank."""
    env.prepare_current_process()
    if resume is not None:
        os.environ["DSGRAPH_RESUME"] = str(resume)
    from dsgraph.runtime.worker import run

    return run(run_dir)
