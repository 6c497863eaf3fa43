"""How the driver watches and steers its workers without touching their collectives.

Each rank keeps a heartbeat: a 32-byte memory-mapped file (phase, last completed step, time, pid),
written with plain memory stores every step, so it costs no system call. The driver reads them to
name the last completed step of a failed run and to notice a rank that stopped moving (a hang in a
collective: DeepSpeed's CPU all-reduce ignores the process-group timeout). To stop cleanly, the
driver writes a stop file naming a step every rank has not yet finished; each rank stops there."""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
from pathlib import Path

_FORMAT = "<qqdq"  # phase, last completed step, unix time of the last beat, pid
_SIZE = struct.calcsize(_FORMAT)
SETUP, TRAINING, FINISHED = 0, 1, 2


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int):
        folder = run_dir / "heartbeat"
        folder.mkdir(exist_ok=True)
        path = folder / f"rank{rank}"
        with open(path, "wb") as f:
            f.write(b"\0" * _SIZE)
        self._file = open(path, "r+b")  # noqa: SIM115 - stays open under the memory map for the whole run
        self._map = mmap.mmap(self._file.fileno(), _SIZE)
        self.beat(SETUP, 0)

    def beat(self, phase: int, step: int) -> None:
        self._map[:_SIZE] = struct.pack(_FORMAT, phase, step, time.time(), os.getpid())


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
    tmp.replace(run_dir / "stop")
    return target


def stop_step(run_dir: Path) -> int | None:
    path = run_dir / "stop"
    if not path.exists():  # one stat() per step
        return None
    try:
        return int(json.loads(path.read_text())["after_step"])
    except (OSError, ValueError, KeyError):
        return None
