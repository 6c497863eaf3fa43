"""`dsgraph run`: compile (no torch yet), then start N workers with torch's elastic launcher and
wait for them; or, inside an existing launcher, run as that rank.

The run directory holds plan.json (what is executed), metrics.jsonl, ckpt/<model>/,
models/<model>/, and per-rank reports (ranks/, done/, failures/)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dsgraph.runtime import env

EXIT_OK, EXIT_USER, EXIT_WORKER, EXIT_INTERRUPTED = 0, 1, 4, 130


def default_run_dir(pipeline: str) -> Path:
    return Path("runs") / f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_plan(run_dir: Path, plan_json: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("failures", "done"):        # a reused run directory starts clean of old reports
        for old in (run_dir / sub).glob("rank*") if (run_dir / sub).is_dir() else []:
            old.unlink()
    tmp = run_dir / f".plan.json.{os.getpid()}"
    tmp.write_text(plan_json, encoding="utf-8")
    tmp.replace(run_dir / "plan.json")       # atomic: ranks of an external launcher race here


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(run_dir: Path, procs: int) -> int:
    """Start `procs` workers on this machine and wait; returns the dsgraph exit code."""
    command = [sys.executable, "-m", "dsgraph.runtime.agent", "--nproc_per_node", str(procs),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "--max_restarts", "0", "-m", "dsgraph.runtime.worker", str(run_dir)]
    environment = env.worker_environment(procs)
    environment["DSGRAPH_DRIVER"] = "1"
    environment.setdefault("LOGLEVEL", "CRITICAL")      # the elastic agent's own log lines
    process = subprocess.Popen(command, env=environment, start_new_session=True)
    try:
        code = process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        print("dsgraph: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return outcome(run_dir, procs, code)


def outcome(run_dir: Path, procs: int, launcher_code: int) -> int:
    """Success is every rank's done marker (a rare abort in a library's exit handler after all
    work is done must not fail a finished run); otherwise the first failure is reported."""
    done = len(list((run_dir / "done").glob("rank*"))) if (run_dir / "done").is_dir() else 0
    if done == procs:
        return EXIT_OK
    failures = sorted((run_dir / "failures").glob("rank*.json")) if (run_dir / "failures").is_dir() else []
    if failures:
        record = json.loads(failures[0].read_text())
        span = record.get("span")
        where = f"{span['file']}:{span['line']}:{span['col']}: " if span else ""
        print(f"{where}error: rank {record['rank']} failed in {record['where']}\n  {record['error']}",
              file=sys.stderr)
        if record.get("internal"):
            print(record.get("traceback", ""), file=sys.stderr)
        others = len(failures) - 1
        if others:
            print(f"  ({others} other rank(s) failed too; see {run_dir / 'failures'})", file=sys.stderr)
        return EXIT_USER if not record.get("internal") else EXIT_WORKER
    print(f"dsgraph: a worker died without a report (launcher exit code {launcher_code}); "
          f"{done} of {procs} ranks finished", file=sys.stderr)
    return EXIT_WORKER


def run_here(run_dir: Path) -> int:
    """Inside torchrun / accelerate launch / deepspeed: this process is one rank."""
    env.prepare_current_process()
    from dsgraph.runtime.worker import run

    return run(run_dir)
