"""How the driver watches and steers its workers without touching their collectives.

Each rank keeps a heartbeat: a memory-mapped file whose first 32 bytes (phase, last completed step,
time, pid) it writes with plain memory stores every step, so it costs no system call. The driver
reads them to name the last completed step of a failed run and to notice a rank that stopped
moving (a hang in a collective: DeepSpeed's CPU all-reduce ignores the process-group timeout).

To stop cleanly, the driver names a step every rank has not yet finished, in the stop file and in
the last 8 bytes of every heartbeat; each rank reads that field after every step (a memory load)
and stops there. A rank that starts after the request finds it in the stop file."""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from pathlib import Path

_FORMAT = "<qqdq"  # phase, last completed step, unix time of the last beat, pid: the rank writes it
_SIZE = struct.calcsize(_FORMAT)
_STOP = struct.Struct("<q")  # after _SIZE: the step to stop after (0: none), the driver writes it
SETUP, TRAINING, FINISHED = 0, 1, 2


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int):
        folder = run_dir / "heartbeat"
        folder.mkdir(exist_ok=True)
        path = folder / f"rank{rank}"
        with open(path, "wb") as f:
            f.write(b"\0" * (_SIZE + _STOP.size))
        self._file = open(path, "r+b")  # noqa: SIM115 - stays open under the memory map for the whole run
        self._map = mmap.mmap(self._file.fileno(), _SIZE + _STOP.size)
        self.beat(SETUP, 0)
        requested = _stop_file(run_dir)  # asked before this heartbeat existed
        if requested:
            _STOP.pack_into(self._map, _SIZE, requested)

    def beat(self, phase: int, step: int) -> None:
        self._map[:_SIZE] = struct.pack(_FORMAT, phase, step, time.time(), os.getpid())

    def stop_step(self) -> int | None:
        """The step the driver asked this rank to stop after, or None: a memory load."""
        (step,) = _STOP.unpack_from(self._map, _SIZE)
        return step or None


def read_heartbeats(run_dir: Path, world: int) -> dict[int, tuple[int, int, float, int]]:
    """rank -> (phase, last completed step, time of the last beat, pid), for started ranks."""
    beats = {}
    for rank in range(world):
        path = run_dir / "heartbeat" / f"rank{rank}"
        try:
            data = path.read_bytes()[:_SIZE]
        except OSError:
            continue
        if len(data) == _SIZE:
            beats[rank] = struct.unpack(_FORMAT, data)
    return beats


def request_stop(run_dir: Path, world: int) -> int:
    """Ask every rank to stop after a step none has finished yet; returns that step."""
    steps = [beat[1] for beat in read_heartbeats(run_dir, world).values()] or [0]
    # Ranks meet in a collective every step, so none is more than one step ahead of another.
    target = max(steps) + 2
    tmp = run_dir / f".stop.{os.getpid()}"
    tmp.write_text(json.dumps({"after_step": target}))
    tmp.replace(run_dir / "stop")  # first the file: a rank that starts from now on reads it
    for rank in range(world):
        try:
            with open(run_dir / "heartbeat" / f"rank{rank}", "r+b") as beat:
                beat.seek(_SIZE)
                beat.write(_STOP.pack(target))
        except OSError:
            pass  # not started yet: it reads the stop file when it starts
    return target


def _stop_file(run_dir: Path) -> int | None:
    try:
        return int(json.loads((run_dir / "stop").read_text())["after_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
