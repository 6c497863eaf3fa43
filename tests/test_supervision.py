"""A run nothing can fool, with real processes: the driver's death or a closed terminal stops the
run and leaves its checkpoint resumable bit-identically; one run owns its directory; a rank hung
in the export is stopped; leftover launcher variables are refused; the environment's faults get
their own exit code and one line; `check` of a `zero = auto` file runs no user code."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsgraph.runtime.launch import _free_port
from test_reliability import FIXTURES, ROOT, heartbeat_step, losses, wait_until, workers_of

pytestmark = pytest.mark.runtime
EXIT_ENVIRONMENT = 74


def dsgraph(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsgraph", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def start_driver(*args: str) -> subprocess.Popen[str]:
    """`dsgraph run` as a terminal starts it: in a process group of its own."""
    return subprocess.Popen(
        [sys.executable, "-m", "dsgraph", "run", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def processes_of(run_dir: Path) -> list[int]:
    """Every process whose command line names the run directory: the launcher and the workers."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if str(run_dir) in (proc.info["cmdline"] or []):
            found.append(proc.pid)
    return found


# -- the driver's death ------------------------------------------------------------------------


def test_kill_9_of_the_driver_stops_every_process_and_leaves_a_resumable_checkpoint(tmp_path):
    # long.dsg has no schedule that depends on `steps`: the killed run of 100000 steps and the
    # straight run of 150 make the same updates.
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    every = ("--set", "checkpoint_every=50")
    done = dsgraph(
        "run", str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(straight), "--set", "steps=150", *every
    )
    assert done.returncode == 0, done.stderr[-2000:]
    driver = start_driver(str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(broken), *every)
    manifest = broken / "ckpt" / "manifests" / "step-00000050.json"
    wait_until(lambda: manifest.exists() or driver.poll() is not None, 240)
    assert driver.poll() is None
    os.killpg(driver.pid, signal.SIGKILL)  # the driver's whole process group, as when a terminal dies
    killed = time.time()
    wait_until(lambda: not processes_of(broken), 15)  # the launcher and every worker
    assert time.time() - killed < 15
    resumed = dsgraph("run", str(FIXTURES / "long.dsg"), "--procs", "2", "--resume", str(broken), "--set", "steps=150")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = int(resumed.stderr.split("resuming from step-")[1][:8])
    a, b = losses(straight), losses(broken)
    assert start >= 50 and sorted(b) == list(range(1, 151))
    for step in range(start + 1, 151):
        assert a[step] == b[step], (step, a[step], b[step])  # bit-identical


def test_sighup_of_the_driver_stops_cleanly_checkpoints_and_exits_130(tmp_path):
    run_dir = tmp_path / "run"
    driver = start_driver(str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(run_dir))
    wait_until(lambda: heartbeat_step(run_dir) >= 5 or driver.poll() is not None, 240)
    driver.send_signal(signal.SIGHUP)  # the terminal closed
    _, stderr = driver.communicate(timeout=90)
    assert driver.returncode == 130, stderr[-2000:]
    stop = json.loads((run_dir / "stop").read_text())["after_step"]
    assert [m.name for m in (run_dir / "ckpt" / "manifests").glob("*.json")] == [f"step-{stop:08d}.json"]
    assert workers_of(run_dir) == []


# -- one owner per run directory ---------------------------------------------------------------


def test_a_second_run_into_a_directory_in_use_is_refused_and_the_first_is_unharmed(tmp_path):
    run_dir = tmp_path / "run"
    first = start_driver(str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(run_dir))
    try:
        wait_until(lambda: heartbeat_step(run_dir) >= 3 or first.poll() is not None, 240)
        for args in (("--run-dir", str(run_dir)), ("--resume", str(run_dir))):
            second = dsgraph("run", str(FIXTURES / "long.dsg"), "--procs", "2", *args, timeout=60)
            assert second.returncode == EXIT_ENVIRONMENT, second.stderr
            assert f"run directory {run_dir} is in use by another dsgraph run (pid {first.pid}:" in second.stderr
        step = heartbeat_step(run_dir)
        wait_until(lambda: heartbeat_step(run_dir) > step + 3, 60)  # the first goes on
        assert first.poll() is None
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one writer
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=90)


def test_workers_of_an_earlier_run_still_alive_keep_the_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A process holding the workers' lock, as a worker of a dead driver would until it exits.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(run_dir / '.dsgraph.workers.lock')!r}, 'a+')\n"
            "fcntl.flock(f, fcntl.LOCK_SH)\nprint('held', flush=True)\ntime.sleep(120)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = dsgraph("run", str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(run_dir), timeout=60)
        assert refused.returncode == EXIT_ENVIRONMENT
        assert "still in use by the workers of an earlier run" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    with open(run_dir / ".dsgraph.lock", "a+") as lock:  # a dead run's lock is no lock
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_done_markers_planted_for_a_run_do_not_make_a_killed_rank_finished(tmp_path):
    run_dir = tmp_path / "run"
    driver = start_driver(str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(run_dir))
    wait_until(lambda: heartbeat_step(run_dir) >= 3 or driver.poll() is not None, 240)
    assert driver.poll() is None
    run_id = json.loads((run_dir / ".dsgraph.lock").read_text())["run_id"]
    (run_dir / "done").mkdir(exist_ok=True)
    for rank in range(2):  # what a confused script (or a person) might write
        (run_dir / "done" / f"rank{rank}").write_text(f"ok {run_id}\n")
    next(w for w in workers_of(run_dir) if w.environ().get("RANK") == "1").kill()
    _, stderr = driver.communicate(timeout=120)
    assert driver.returncode == 4 and "rank 1 was killed by SIGKILL" in stderr, stderr[-2000:]


def test_resume_and_run_dir_together_are_refused(tmp_path):
    done = dsgraph(
        "run", str(FIXTURES / "resume.dsg"), "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b"),
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "not both" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the watchdog after training ---------------------------------------------------------------


def test_a_rank_hung_in_the_export_is_stopped_by_the_watchdog(tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    done = dsgraph(
        "run", str(FIXTURES / "hang_export.dsg"), "--procs", "2", "--run-dir", str(run_dir), "--hang-timeout", "4"
    )
    assert done.returncode == 4, done.stderr[-2000:]
    assert "made no progress for" in done.stderr and "in the export (last completed step 3)" in done.stderr
    assert workers_of(run_dir) == []
    assert time.time() - start < 120


# -- launcher variables ------------------------------------------------------------------------


def _environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, **extra}


def test_leftover_launcher_variables_are_refused_with_their_names(tmp_path):
    partial = dsgraph(
        "run", str(FIXTURES / "long.dsg"), "--run-dir", str(tmp_path / "a"),
        env=_environment(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"), timeout=60,
    )  # fmt: skip
    assert partial.returncode == 2
    assert "RANK, WORLD_SIZE, LOCAL_RANK are set but MASTER_ADDR, MASTER_PORT are not" in partial.stderr
    whole = dsgraph(
        "run", str(FIXTURES / "long.dsg"), "--run-dir", str(tmp_path / "b"),
        env=_environment(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511"),
        timeout=60,
    )  # fmt: skip
    assert whole.returncode == 2
    assert "no launcher (torchrun, accelerate launch, deepspeed, mpirun, srun) started this process" in whole.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_launcher_named_only_in_an_argument_above_is_no_launcher(tmp_path):
    # A shell whose command line merely mentions "deepspeed" (a folder name) is not a launcher.
    folder = tmp_path / "deepspeed-exp"
    folder.mkdir()
    pipeline = folder / "resume.dsg"
    pipeline.write_text((FIXTURES / "resume.dsg").read_text())
    variables = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    done = subprocess.run(
        ["sh", "-c", f"{sys.executable} -m dsgraph run {pipeline} --run-dir {tmp_path / 'run'}; exit $?"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=_environment(**variables),
    )  # fmt: skip
    assert done.returncode == 2 and "no launcher" in done.stderr, done.stderr


def test_under_torchrun_each_process_is_one_rank_of_the_job(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "dsgraph", "run", str(FIXTURES / "resume.dsg"), "--run-dir", str(run_dir), "--set", "steps=2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_environment(LOGLEVEL="CRITICAL"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(run_dir)) == [1, 2]
    markers = [(run_dir / "done" / f"rank{r}").read_text().split() for r in range(2)]
    assert markers[0] == markers[1] and markers[0][0] == "ok"  # one job, one run id


def test_internal_variables_in_the_shell_are_not_read(tmp_path):
    """An old DSGRAPH_RESUME or DSGRAPH_DRIVER in the user's shell changes nothing: workers are told
    on their command line."""
    run_dir = tmp_path / "run"
    env = _environment(DSGRAPH_RESUME=str(tmp_path / "nowhere.json"), DSGRAPH_DRIVER="1")
    done = dsgraph(
        "run", str(FIXTURES / "resume.dsg"), "--procs", "2", "--run-dir", str(run_dir), "--set", "steps=2", env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(losses(run_dir)) == [1, 2]


# -- the environment's faults ------------------------------------------------------------------


def _fault(run_dir: Path) -> subprocess.CompletedProcess[str]:
    return dsgraph("run", str(FIXTURES / "resume.dsg"), "--procs", "2", "--run-dir", str(run_dir), "--set", "steps=2")


def _one_line(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == EXIT_ENVIRONMENT, (done.returncode, done.stderr[-2000:])
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.startswith("dsgraph:") and not line.startswith("dsgraph: 2 processes, run directory")
    ]
    assert len(lines) == 1 and all(w in lines[0] for w in words), done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr


def test_a_run_directory_that_is_a_file_under_a_file_or_a_dangling_link_is_an_environment_fault(tmp_path):
    # and one whose files or folders are not what a run writes there
    (tmp_path / "file").write_text("x")
    _one_line(_fault(tmp_path / "file"), "is not a directory")
    _one_line(_fault(tmp_path / "file" / "sub"), "Not a directory")
    os.symlink(tmp_path / "gone", tmp_path / "link")
    _one_line(_fault(tmp_path / "link"), "symbolic link", "does not exist")
    (tmp_path / "odd" / "metrics.jsonl").mkdir(parents=True)
    _one_line(_fault(tmp_path / "odd"), "metrics.jsonl is not a plain file")
    (tmp_path / "odd2").mkdir()
    (tmp_path / "odd2" / "heartbeat").write_text("")
    _one_line(_fault(tmp_path / "odd2"), "heartbeat is not a folder")
    (tmp_path / "odd3" / "ckpt").mkdir(parents=True)
    (tmp_path / "odd3" / "ckpt" / "left").symlink_to(tmp_path)  # checkpoints would leave the run directory
    _one_line(_fault(tmp_path / "odd3"), "ckpt/left is a symbolic link")


def test_links_planted_in_the_run_directory_are_never_written_through(tmp_path):
    precious = tmp_path / "precious"
    precious.write_text("keep")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".dsgraph.lock").symlink_to(precious)
    _one_line(_fault(run_dir), ".dsgraph.lock is a symbolic link")
    (run_dir / ".dsgraph.lock").unlink()
    for name in ("heartbeat/rank0", "failures/rank1.json", "done/rank0", ".metrics.jsonl.tmp", "ranks/rank0.json"):
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).symlink_to(precious)
    done = _fault(run_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    assert precious.read_text() == "keep"


def _mount(target: Path, options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_run_directory_is_an_environment_fault(tmp_path):
    mount = tmp_path / "ro"
    _mount(mount, "size=1m,ro")
    try:
        _one_line(_fault(mount / "run"), "Read-only file system")
    finally:
        _unmount(mount)


def _fill(mount: Path, name: str) -> None:
    filler = os.open(mount / name, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError):
        while True:  # until the file system is full
            os.write(filler, b"\0" * 4096)
    os.close(filler)


def test_a_full_disk_at_the_start_is_an_environment_fault(tmp_path):
    mount = tmp_path / "small"
    _mount(mount, "size=4m")
    try:
        _fill(mount, "filler")
        _one_line(_fault(mount / "run"), "No space left on device")
    finally:
        _unmount(mount)


@pytest.mark.parametrize(
    ("settings", "where", "path"),
    [
        (("log_every=1",), "(rank 0, in training)", "metrics.jsonl"),
        (("log_every=100000", "checkpoint_every=40"), "in saving the checkpoint of step 40", "ckpt"),
    ],
    ids=["metrics", "checkpoint"],
)
def test_a_disk_that_fills_while_the_run_trains_is_an_environment_fault(tmp_path, settings, where, path):
    mount = tmp_path / "small"
    _mount(mount, "size=4m")
    try:
        run_dir = mount / "run"
        overrides = [part for setting in settings for part in ("--set", setting)]
        driver = start_driver(str(FIXTURES / "long.dsg"), "--procs", "2", "--run-dir", str(run_dir), *overrides)
        wait_until(lambda: heartbeat_step(run_dir) >= 3 or driver.poll() is not None, 240)
        assert driver.poll() is None
        _fill(mount, "filler")  # the next write is the metrics line, or the checkpoint
        _, stderr = driver.communicate(timeout=120)
        _one_line(
            subprocess.CompletedProcess(driver.args, driver.returncode, "", stderr),
            "No space left on device",
            str(run_dir / path),
            where,
        )
        assert workers_of(run_dir) == []
    finally:
        _unmount(mount)


def test_a_read_only_comm_op_cache_is_used_through_a_private_copy(tmp_path):
    from dsgraph.runtime.env import extensions_dir

    built = extensions_dir(os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    cache_home = tmp_path / "cache"
    _mount(cache_home, "size=256m")
    try:
        read_only = cache_home / "dsgraph" / "torch_extensions" / built.name
        read_only.parent.mkdir(parents=True)
        if built.is_dir():  # the build earlier runs made (else the copy builds it once)
            subprocess.run(["cp", "-a", str(built), str(read_only.parent)], check=True)
        else:
            read_only.mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(cache_home)], check=True)
        environment = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
        environment["XDG_CACHE_HOME"] = str(cache_home)
        runs = []
        for name in ("first", "second"):
            done = dsgraph(
                "run", str(FIXTURES / "resume.dsg"), "--procs", "2", "--run-dir", str(tmp_path / name),
                "--set", "steps=2", env=environment,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            runs.append(done.stderr)
        notice = f"the op cache {read_only} is not writable; using a copy in "
        copies = {line.split(notice)[1].split()[0] for stderr in runs for line in stderr.splitlines() if notice in line}
        assert len(copies) == 1, runs  # made once, then reused
        copy = Path(copies.pop())
        assert copy.parent.stat().st_mode & 0o077 == 0 and copy.parent.stat().st_uid == os.getuid()
    finally:
        _unmount(cache_home)


# -- compiling runs no user code ---------------------------------------------------------------


def test_check_of_a_zero_auto_file_runs_no_factory(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "sidefx.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported')\n"
        "import torch\n\ndef make(width):\n    return torch.nn.Linear(width, 2)\n"
    )
    (tmp_path / "p.dsg").write_text((ROOT / "tests" / "errors" / "dsg418_auto_factory_deferred.dsg").read_text())
    for command in (("check",), ("compile",), ("dot",)):
        done = dsgraph(*command, str(tmp_path / "p.dsg"), timeout=60)
        assert done.returncode == 0, done.stderr
        assert "DSG418" in done.stderr + done.stdout
        assert not marker.exists(), command
    trusted = dsgraph("compile", str(tmp_path / "p.dsg"), "--world-size", "2", "--trust-user-code", timeout=120)
    assert trusted.returncode == 0, trusted.stderr
    assert marker.exists() and "DSG418" not in trusted.stderr
