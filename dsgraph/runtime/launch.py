"""`dsgraph run`: compile (no torch yet), then start N workers with torch's elastic launcher and
watch them; or, inside an existing launcher, run as that rank.

The driver owns its run directory (dsgraph.runtime.rundir) and never waits blindly: it polls the
workers' heartbeats, so that a rank stuck in a collective in any phase (training, a checkpoint, the
export) ends the run after `--hang-timeout` seconds; a killed rank ends it as soon as torch's
launcher notices. Ctrl-C, SIGTERM and SIGHUP (a closed terminal) stop the run cleanly. When the
driver itself is killed, its launcher dies with it (a parent-death signal) and every worker exits
within a second (it watches the driver). Either way every worker is gone when `dsgraph run`
returns."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from dsgraph.runtime import control, env, rundir

EXIT_OK, EXIT_USER, EXIT_WORKER, EXIT_ENVIRONMENT, EXIT_INTERRUPTED = 0, 1, 4, 74, 130
SETUP_TIMEOUT = 900  # the first run builds DeepSpeed's comm op (~30-50 s on 2 cores)


def default_run_dir(pipeline: str) -> Path:
    return Path("runs") / f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_plan(run_dir: Path, plan_json: str) -> None:
    """The plan, into a run directory that starts clean (the markers of an earlier run go).
    OSError is the environment's (a full disk, a read-only file system)."""
    for sub in ("failures", "done", "heartbeat"):
        for old in (run_dir / sub).glob("rank*") if (run_dir / sub).is_dir() else []:
            old.unlink()
    for stale in ("stop", "agent_failure.json"):
        (run_dir / stale).unlink(missing_ok=True)
    tmp = run_dir / f".plan.json.{os.getpid()}"
    rundir.write_new(tmp, plan_json)
    tmp.replace(run_dir / "plan.json")  # atomic: ranks of an external launcher race here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def worker_arguments(run_dir: Path, run_id: str, driver: int | None, resume: Path | None) -> list[str]:
    """What a worker is told, on its command line, never through the environment: a variable
    left in a user's shell could otherwise pass for it."""
    out = [str(run_dir), "--run-id", run_id]
    if driver is not None:
        out += ["--driver", str(driver)]
    if resume is not None:
        out += ["--resume", str(resume)]
    return out


def launch(run_dir: Path, procs: int, hang_timeout: float, run_id: str, resume: Path | None = None) -> int:
    """Start `procs` workers on this machine, watch them, and return the dsgraph exit code."""
    torchrun = ["--nproc_per_node", str(procs), "--nnodes", "1", "--master_addr", "127.0.0.1"]
    torchrun += ["--master_port", str(_free_port()), "--max_restarts", "0", "-m", "dsgraph.runtime.worker"]
    command = [sys.executable, "-m", "dsgraph.runtime.agent", str(run_dir), *torchrun]
    command += worker_arguments(run_dir, run_id, os.getpid(), resume)
    environment = env.worker_environment(procs)
    environment.setdefault("LOGLEVEL", "CRITICAL")  # the elastic agent's own log lines
    process = subprocess.Popen(command, env=environment, start_new_session=True, preexec_fn=_die_with_parent)
    for stop in (signal.SIGTERM, signal.SIGHUP):  # `kill`, a closed terminal: the same clean stop as Ctrl-C
        signal.signal(stop, _terminate)
    try:
        code, hung = _watch(process, run_dir, procs, hang_timeout, run_id)
    except KeyboardInterrupt:
        return _interrupt(process, run_dir, procs, run_id)
    finally:
        _kill_all(process, run_dir, procs, run_id)
    if hung:
        return EXIT_WORKER
    return outcome(run_dir, procs, code, run_id)


def _die_with_parent() -> None:
    """In the launcher, before it starts: the kernel kills it when the driver dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the workers' own watch of the driver still ends the run


def _watch(
    process: subprocess.Popen[bytes], run_dir: Path, procs: int, hang_timeout: float, run_id: str
) -> tuple[int, bool]:
    last_progress: dict[int, tuple[tuple[int, int], float]] = {}  # rank -> ((phase, step), when it changed)
    while True:
        try:
            return process.wait(timeout=1.0), False
        except subprocess.TimeoutExpired:
            pass
        now = time.time()
        for rank, beat in control.read_heartbeats(run_dir, procs, run_id).items():
            if beat.phase == control.FINISHED:
                continue
            seen = last_progress.get(rank)
            if seen is None or seen[0] != (beat.phase, beat.step):
                last_progress[rank] = ((beat.phase, beat.step), now)
                continue
            limit = max(hang_timeout, SETUP_TIMEOUT) if beat.phase == control.SETUP else hang_timeout
            if now - seen[1] > limit:
                where = (
                    f"at step {beat.step + 1} (last completed step {beat.step})"
                    if beat.phase == control.TRAINING
                    else f"in {control.PHASES.get(beat.phase, 'an unknown phase')} (last completed step {beat.step})"
                )
                _report(
                    f"dsgraph: rank {rank} made no progress for {now - seen[1]:.0f} s {where}; "
                    "stopping the run (a rank stuck in a collective)"
                )
                _kill_all(process, run_dir, procs, run_id)
                return -1, True


def _report(text: str) -> None:
    """A line of the driver's, on a line of its own: rank 0's progress bar may have left its line
    open (in a terminal it is cleared, in a log the message starts a new line)."""
    start = "\r\033[K" if sys.stderr.isatty() else "\n"
    sys.stderr.write(f"{start}{text}\n")
    sys.stderr.flush()


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def _interrupt(process: subprocess.Popen[bytes], run_dir: Path, procs: int, run_id: str) -> int:
    """Ctrl-C: ask the ranks to stop after a step none has finished (they checkpoint it when
    checkpointing is on); a second Ctrl-C, or 60 s, stops them at once."""
    step = control.request_stop(run_dir, procs, run_id)
    _report(f"dsgraph: stopping after step {step} (Ctrl-C again to stop at once)")
    with contextlib.suppress(KeyboardInterrupt, subprocess.TimeoutExpired):
        process.wait(timeout=60)
    _kill_all(process, run_dir, procs, run_id)
    return EXIT_INTERRUPTED


def _kill_all(process: subprocess.Popen[bytes], run_dir: Path, procs: int, run_id: str) -> None:
    """Leave no process behind: the launcher's group, and every worker of this run by the pid its
    heartbeat names (torch's launcher starts workers in sessions of their own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for beat in control.read_heartbeats(run_dir, procs, run_id).values():
        if _is_worker_of(beat.pid, run_id):  # a pid may have been reused: check it is ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(beat.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _is_worker_of(pid: int, run_id: str) -> bool:
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:  # gone, or not ours to inspect
        return False
    return "dsgraph.runtime.worker" in cmdline and run_id in cmdline


def last_completed_step(run_dir: Path, procs: int, run_id: str) -> int:
    beats = control.read_heartbeats(run_dir, procs, run_id)
    return min((b.step for b in beats.values()), default=0)


def _records(folder: Path, run_id: str) -> list[dict[str, Any]]:
    """This run's failure records; one that cannot be read (a full disk tore it) is skipped."""
    out = []
    for path in sorted(folder.glob("rank*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("run_id") == run_id:
            out.append(record)
    return out


def _agent_exits(run_dir: Path) -> list[dict[str, Any]]:
    try:
        exits = json.loads((run_dir / "agent_failure.json").read_text())
    except (OSError, ValueError):  # none, or torn by a full disk
        return []
    return [e for e in exits if isinstance(e, dict)] if isinstance(exits, list) else []


def _done(run_dir: Path, procs: int, run_id: str) -> int:
    """The ranks of this run that finished: a done marker with its id, and a heartbeat that says
    so (a marker alone, left or planted, does not make a killed rank finished)."""
    beats = control.read_heartbeats(run_dir, procs, run_id)
    count = 0
    for rank in range(procs):
        finished = rank in beats and beats[rank].phase == control.FINISHED
        with contextlib.suppress(OSError):
            count += finished and (run_dir / "done" / f"rank{rank}").read_text().split()[-1:] == [run_id]
    return count


def outcome(run_dir: Path, procs: int, launcher_code: int, run_id: str) -> int:
    """Success is every rank's done marker (a rare abort in a library's exit handler after all
    work is done must not fail a finished run); otherwise the first failure is reported."""
    done = _done(run_dir, procs, run_id)
    if done == procs:
        return EXIT_OK
    records = _records(run_dir / "failures", run_id)
    reported = {r.get("rank") for r in records}
    exits = _agent_exits(run_dir)
    silent = [e for e in exits if e.get("rank") not in reported and (e.get("signal") or e.get("exitcode") != 1)]
    if records:  # the agent SIGTERMs the survivors of a reported failure: not a cause
        silent = [e for e in silent if e.get("signal") != "SIGTERM"]
    if silent:
        # A rank that went without a report was killed (or crashed hard); what the others then
        # reported (a closed connection in a collective) follows from it.
        died = min(silent, key=lambda e: (e.get("signal") == "SIGTERM", e.get("rank", 0)))
        step = last_completed_step(run_dir, procs, run_id)
        how = f"was killed by {died['signal']}" if died.get("signal") else f"exited with code {died.get('exitcode')}"
        _report(f"dsgraph: rank {died.get('rank')} {how}; last completed step {step}")
        return EXIT_WORKER
    if records:
        record = min(records, key=lambda r: r.get("time", 0))
        if record.get("environment"):  # the machine's fault: one line, the path and the OS error
            _report(f"dsgraph: {record['error']} (rank {record['rank']}, in {record['where']})")
            return EXIT_ENVIRONMENT
        span = record.get("span")
        where = f"{span['file']}:{span['line']}:{span['col']}: " if span else ""
        _report(f"{where}error: rank {record['rank']} failed in {record['where']}\n  {record['error']}")
        if record.get("internal"):
            print(record.get("traceback", ""), file=sys.stderr)
        if len(records) > 1:
            print(f"  ({len(records) - 1} other rank(s) failed too; see {run_dir / 'failures'})", file=sys.stderr)
        return EXIT_USER if not record.get("internal") else EXIT_WORKER
    step = last_completed_step(run_dir, procs, run_id)
    _report(
        f"dsgraph: the workers stopped without a report (launcher exit code {launcher_code}); "
        f"{done} of {procs} ranks finished; last completed step {step}"
    )
    return EXIT_WORKER


def run_here(run_dir: Path, run_id: str, resume: Path | None = None) -> int:
    """Inside torchrun / accelerate launch / deepspeed: this process is one rank."""
    env.prepare_current_process()
    from dsgraph.runtime.worker import run

    return run(run_dir, run_id, None, resume)
