"""Faults and resume, with real 2-process DeepSpeed runs on CPU: exact resume after the workers
are killed, refusal to resume a different plan, fast failure on a killed or hung rank, a clean
stop on Ctrl-C, and the documented exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
pytestmark = pytest.mark.runtime


def command(pipeline: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsgraph", "run", str(pipeline), "--procs", "2", *extra]


def run(pipeline: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(pipeline, *extra), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start(pipeline: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        command(pipeline, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def losses(run_dir: Path) -> dict[int, dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["losses"] for r in rows if r["split"] == "train"}


def heartbeat_step(run_dir: Path) -> int:
    from dsgraph.runtime.control import read_heartbeats

    beats = read_heartbeats(run_dir, 2)
    return min((b[1] for b in beats.values()), default=0) if len(beats) == 2 else 0


def wait_until(predicate, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def workers_of(run_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "dsgraph.runtime.worker" in cmdline and str(run_dir) in cmdline:
            found.append(proc)
    return found


def test_resume_after_the_workers_are_killed_is_bit_identical(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    done = run(FIXTURES / "resume.dsg", "--run-dir", str(straight))
    assert done.returncode == 0, done.stderr[-2000:]

    process = start(FIXTURES / "resume.dsg", "--run-dir", str(broken))
    manifest = broken / "ckpt" / "manifests" / "step-00000008.json"
    wait_until(lambda: manifest.exists() or process.poll() is not None, 240)
    for worker in workers_of(broken):  # SIGKILL, mid-run
        worker.kill()
    process.wait(timeout=60)
    assert process.returncode != 0 or not (broken / "models").exists()

    resumed = run(FIXTURES / "resume.dsg", "--resume", str(broken))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-00000008.json" in resumed.stderr
    a, b = losses(straight), losses(broken)
    assert sorted(b) == list(range(1, 17))
    for step in range(9, 17):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical, not close


def test_resume_refuses_a_different_plan_world_size_or_no_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert run(FIXTURES / "resume.dsg", "--run-dir", str(run_dir), "--set", "steps=8").returncode == 0
    changed = run(
        FIXTURES / "resume.dsg", "--resume", str(run_dir), "--set", "seed=12", "--set", "left.optimizer.lr=0.5"
    )
    assert changed.returncode == 1
    assert "error[DSG501]" in changed.stderr and "seed was 11, is now 12" in changed.stderr
    assert "model `left` changed: deepspeed_config" in changed.stderr
    assert "--set[1]:1:1: error[DSG501]" in changed.stderr  # the seed, at its --set
    assert "--set[2]:1:1: error[DSG501]" in changed.stderr  # the learning rate, at its --set
    more = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsgraph",
            "run",
            str(FIXTURES / "resume.dsg"),
            "--procs",
            "1",
            "--resume",
            str(run_dir),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert more.returncode == 1 and "saved by 2 processes, this run has 1" in more.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run(FIXTURES / "resume.dsg", "--resume", str(empty))
    assert none.returncode == 1 and "error[DSG502]" in none.stderr


def test_an_incomplete_checkpoint_is_never_used_or_unpickled(tmp_path):
    run_dir = tmp_path / "run"
    assert run(FIXTURES / "resume.dsg", "--run-dir", str(run_dir), "--set", "steps=8").returncode == 0
    # A crash while saving step 16: shards written, no rename, no manifest. Its files would run
    # code if unpickled.
    marker = tmp_path / "unpickled"
    for model in ("left", "right"):
        partial = run_dir / "ckpt" / model / "step-00000016.partial"
        partial.mkdir(parents=True)
        (partial / "mp_rank_00_model_states.pt").write_bytes(_evil_pickle(marker))
    resumed = run(FIXTURES / "resume.dsg", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step-00000008.json" in resumed.stderr
    assert not marker.exists()
    # Without any valid manifest nothing is loaded at all.
    for manifest in (run_dir / "ckpt" / "manifests").glob("*.json"):
        manifest.unlink()
    refused = run(FIXTURES / "resume.dsg", "--resume", str(run_dir))
    assert refused.returncode == 1 and "DSG502" in refused.stderr and "incomplete" in refused.stderr
    assert not marker.exists()


def _evil_pickle(marker: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Evil())


def test_a_killed_worker_ends_the_run_with_exit_4_and_no_orphans(tmp_path):
    run_dir = tmp_path / "run"
    process = start(FIXTURES / "long.dsg", "--run-dir", str(run_dir))
    wait_until(lambda: heartbeat_step(run_dir) >= 5 or process.poll() is not None, 240)
    victim = next(w for w in workers_of(run_dir) if w.environ().get("RANK") == "1")
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 4, stderr[-2000:]
    assert time.time() - killed_at < 30
    assert "rank 1 was killed by SIGKILL" in stderr and "last completed step" in stderr
    assert workers_of(run_dir) == []


def test_a_hung_worker_is_stopped_by_the_watchdog(tmp_path):
    run_dir = tmp_path / "run"
    start_time = time.time()
    done = run(FIXTURES / "hang.dsg", "--run-dir", str(run_dir), "--hang-timeout", "4", timeout=240)
    assert done.returncode == 4, done.stderr[-2000:]
    assert "made no progress for" in done.stderr and "last completed step 3" in done.stderr
    assert workers_of(run_dir) == []
    assert time.time() - start_time < 120


def test_ctrl_c_stops_the_workers_checkpoints_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    process = start(FIXTURES / "long.dsg", "--run-dir", str(run_dir))
    wait_until(lambda: heartbeat_step(run_dir) >= 5 or process.poll() is not None, 240)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr[-2000:]
    stop = json.loads((run_dir / "stop").read_text())["after_step"]
    manifests = sorted((run_dir / "ckpt" / "manifests").glob("*.json"))
    assert [m.name for m in manifests] == [f"step-{stop:08d}.json"]
    assert max(losses(run_dir)) == stop
    assert workers_of(run_dir) == []


def test_an_exception_on_one_rank_names_the_step_and_line(tmp_path):
    done = run(FIXTURES / "raise_in_loss.dsg", "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 1
    assert "raise_in_loss.dsg:10:5: error: rank 1 failed in loss `fit`" in done.stderr
    assert "the loss broke on rank 1" in done.stderr and "Traceback" not in done.stderr


def test_exit_codes_for_usage_and_internal_errors(tmp_path, monkeypatch, capsys):
    from dsgraph import cli

    assert run(FIXTURES / "missing.dsg").returncode == 2
    assert subprocess.run([sys.executable, "-m", "dsgraph", "run"], capture_output=True).returncode == 2

    def broken(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_check", broken)
    assert cli.main(["check", "x.dsg"]) == 70
    assert "Traceback" not in capsys.readouterr().err
    assert cli.main(["--debug", "check", "x.dsg"]) == 70
    assert "Traceback" in capsys.readouterr().err
