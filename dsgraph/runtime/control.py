"""How the driver watches and steers its workers without touching their collectives, and how the
workers notice that the driver is gone.

Each rank keeps a heartbeat: a memory-mapped file whose first 40 bytes (phase, last completed
step, time, pid, run id) it writes with plain memory stores, so it costs no system call. The
driver reads them to name the last completed step of a failed run and to notice a rank that
stopped moving in any phase (a hang in a collective: DeepSpeed's CPU all-reduce ignores the
process-group timeout). Only heartbeats of the driver's own run count.

To stop cleanly, the driver names a step every rank has not yet finished, in the stop file and in
the last 8 bytes of every heartbeat; each rank reads that field after every step (a memory load)
and stops there. A rank that starts after the request finds it in the stop file.

A worker also watches its driver: when the driver dies (killed, its terminal closed), the worker
exits within a second, so that no run goes on training unwatched."""

from __future__ import annotations

import json
import mmap
import os
import select
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

from dsgraph.runtime import rundir

_FORMAT = struct.Struct("<qqdq8s")  # phase, last completed step, time of the beat, pid, run id
_STOP = struct.Struct("<q")  # after the beat: the step to stop after (0: none), the driver writes it
SETUP, TRAINING, FINISHED, CHECKPOINT, EXPORT, EVALUATION, PRECOMPUTE = 0, 1, 2, 3, 4, 5, 6
PHASES = {
    SETUP: "setup",
    TRAINING: "training",
    FINISHED: "finished",
    CHECKPOINT: "a checkpoint",
    EXPORT: "the export",
    EVALUATION: "an evaluation",
    PRECOMPUTE: "the precompute",
}
EXIT_DRIVER_GONE = 75  # a worker's exit code when its driver died


class Beat(NamedTuple):
    phase: int
    step: int
    time: float
    pid: int


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int, run_id: str):
        folder = run_dir / "heartbeat"
        folder.mkdir(exist_ok=True)
        path = folder / f"rank{rank}"
        self._id = bytes.fromhex(run_id)
        self._file = rundir.open_new(path, read=True)  # stays open under the memory map for the whole run
        self._file.write(b"\0" * (_FORMAT.size + _STOP.size))
        self._file.flush()
        self._map = mmap.mmap(self._file.fileno(), _FORMAT.size + _STOP.size)
        self.beat(SETUP, 0)
        requested = _stop_file(run_dir)  # asked before this heartbeat existed
        if requested:
            _STOP.pack_into(self._map, _FORMAT.size, requested)

    def beat(self, phase: int, step: int) -> None:
        _FORMAT.pack_into(self._map, 0, phase, step, time.time(), os.getpid(), self._id)

    def stop_step(self) -> int | None:
        """The step the driver asked this rank to stop after, or None: a memory load."""
        (step,) = _STOP.unpack_from(self._map, _FORMAT.size)
        return step or None


def read_heartbeats(run_dir: Path, world: int, run_id: str | None = None) -> dict[int, Beat]:
    """rank -> its last beat, for the ranks of run `run_id` (None: of any run) that have started."""
    beats = {}
    for rank in range(world):
        try:
            data = (run_dir / "heartbeat" / f"rank{rank}").read_bytes()[: _FORMAT.size]
        except OSError:
            continue
        if len(data) == _FORMAT.size:
            phase, step, when, pid, owner = _FORMAT.unpack(data)
            if run_id is None or owner == bytes.fromhex(run_id):
                beats[rank] = Beat(phase, step, when, pid)
    return beats


def request_stop(run_dir: Path, world: int, run_id: str) -> int:
    """Ask every rank to stop after a step none has finished yet; returns that step."""
    steps = [beat.step for beat in read_heartbeats(run_dir, world, run_id).values()] or [0]
    # Ranks meet in a collective every step, so none is more than one step ahead of another.
    target = max(steps) + 2
    tmp = run_dir / f".stop.{os.getpid()}"
    try:
        rundir.write_new(tmp, json.dumps({"after_step": target}))
        tmp.replace(run_dir / "stop")  # first the file: a rank that starts from now on reads it
    except OSError:
        pass  # a full disk: the heartbeats below are written in place and need no new space
    for rank in range(world):
        try:
            with rundir.open_existing(run_dir / "heartbeat" / f"rank{rank}") as beat:
                beat.seek(_FORMAT.size)
                beat.write(_STOP.pack(target))
        except OSError:
            pass  # not started yet: it reads the stop file when it starts
    return target


def _stop_file(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "stop").read_text())["after_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def exit_when_gone(pid: int) -> None:
    """Ends this process (exit code EXIT_DRIVER_GONE) as soon as process `pid` ends: a daemon
    thread waits on a pidfd (no polling), or checks the process every 0.5 s where there is none."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(EXIT_DRIVER_GONE)  # already gone
    except (AttributeError, OSError):
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable when the process has ended
        else:
            while _alive(pid):
                time.sleep(0.5)
        os._exit(EXIT_DRIVER_GONE)  # no clean-up: a collective could wait forever on the others

    threading.Thread(target=watch, name="dsgraph-driver-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
