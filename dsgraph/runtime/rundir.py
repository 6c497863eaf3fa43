"""The run directory: checked before anything is written to it, and owned by one run at a time.

Ownership is two `flock` locks in the directory. The driver of a run (`dsgraph run`) holds
`.dsgraph.lock` exclusively for as long as it lives, and writes who it is into it; each worker
holds `.dsgraph.workers.lock` shared for as long as it lives. A second run, or a resume, is
refused while either is held: by a live driver (its pid and command are named), or by workers of
an earlier run that have not exited yet. A lock dies with the process that holds it, so the lock
of a dead run is never in the way. Every run also has an id, written into its heartbeats, done
markers and failure records, so that no run mistakes another's processes or markers for its own.

Faults of the machine (a run directory that is a file, lies under a file, is a dangling link, is
read-only, or a full disk) are `EnvironmentFault`s: one plain line naming the path and the OS
error, and their own exit code."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import IO, Any, BinaryIO

DRIVER_LOCK = ".dsgraph.lock"
WORKERS_LOCK = ".dsgraph.workers.lock"
# OS errors that are the machine's (disk, permissions, file system), not a bug of dsgraph.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.ELOOP,
        errno.ENAMETOOLONG,
        errno.EIO,
        errno.EISDIR,
        errno.EMFILE,
        errno.ENFILE,
    }
)


class EnvironmentFault(Exception):
    """A fault of the machine, told in one line that names the path and the OS error."""


def is_environment_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


FULL_BELOW = 1 << 20  # free bytes under which a file system counts as full


def environment_cause(error: BaseException, path: Path) -> OSError | None:
    """The machine's fault behind `error`, if it is one: an OSError of the machine, or any error
    raised while the file system of `path` has no room left (torch's zip writer reports a full
    disk as a RuntimeError)."""
    if isinstance(error, OSError):
        return error if is_environment_error(error) else None
    if not isinstance(error, Exception):  # Ctrl-C, an exit
        return None
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    if free < FULL_BELOW:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


def describe(error: OSError, path: Path | str | None = None) -> str:
    """`No space left on device (errno 28)`, with the path it concerns."""
    # Of two paths (a copy, a rename), the second is the one written.
    where = next((name for name in (error.filename2, error.filename) if name is not None), path)
    text = f"{error.strerror or error} (errno {error.errno})"
    return f"{where}: {text}" if where is not None else text


def new_run_id() -> str:
    return secrets.token_hex(8)


def prepare(run_dir: Path) -> None:
    """The run directory exists and can be written; else an EnvironmentFault."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise EnvironmentFault(
            f"run directory {run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not exist"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise EnvironmentFault(f"run directory {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".probe.{os.getpid()}"
        write_new(probe, b"x")
        probe.unlink()
    except OSError as error:
        raise EnvironmentFault(f"cannot use run directory {run_dir}: {describe(error)}") from None
    _check_layout(run_dir)


# What a run writes into its directory: files it rewrites, and folders (with, for `ckpt` and
# `models`, a folder per model below).
_FILES = ("plan.json", "metrics.jsonl")
_FOLDERS = ("ckpt", "models", "heartbeat", "done", "failures", "ranks", "deepspeed_configs")


def _check_layout(run_dir: Path) -> None:
    """What an earlier run (or a person) left in the run directory can take this run's files:
    each must be what the run writes there, and no link. Checkpoints are written into, removed
    from and loaded from `ckpt/` only inside the run directory."""

    def refuse(entry: Path, what: str) -> EnvironmentFault:
        return EnvironmentFault(f"{entry} {what}; move it away to use run directory {run_dir}")

    for name in _FILES:
        entry = run_dir / name
        if os.path.lexists(entry) and (entry.is_symlink() or not entry.is_file()):
            raise refuse(entry, "is not a plain file")
    for name in _FOLDERS:
        entry = run_dir / name
        if entry.is_symlink():
            raise refuse(entry, f"is a symbolic link (to {os.readlink(entry)})")
        if os.path.lexists(entry) and not entry.is_dir():
            raise refuse(entry, "is not a folder")
        if entry.is_dir() and not os.access(entry, os.W_OK | os.X_OK):
            raise refuse(entry, "is not writable by this user")
    for name in ("ckpt", "models"):
        for entry in sorted((run_dir / name).iterdir()) if (run_dir / name).is_dir() else []:
            if entry.is_symlink():
                raise refuse(entry, f"is a symbolic link (to {os.readlink(entry)})")


class RunLock:
    """The driver's exclusive ownership of a run directory (see the module's docstring)."""

    def __init__(self, file: IO[str]):
        self._file = file

    @staticmethod
    def acquire(run_dir: Path, run_id: str) -> RunLock:
        file = _open_lock(run_dir / DRIVER_LOCK)
        if not _lock(file, fcntl.LOCK_EX):
            holder = _holder(run_dir / DRIVER_LOCK)
            file.close()
            raise EnvironmentFault(f"run directory {run_dir} is in use by another dsgraph run{holder}")
        workers = _open_lock(run_dir / WORKERS_LOCK)
        try:
            if not _lock(workers, fcntl.LOCK_EX):  # nothing of an earlier run still works here
                file.close()
                raise EnvironmentFault(
                    f"run directory {run_dir} is still in use by the workers of an earlier run, which have "
                    "not exited yet; wait for them, or stop them"
                )
        finally:
            workers.close()
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "run_id": run_id, "command": sys.argv, "started": time.time()}))
        file.flush()
        return RunLock(file)

    def release(self) -> None:
        self._file.close()


def hold_shared(run_dir: Path, name: str) -> IO[str]:
    """A shared lock on `name` held for as long as the returned file stays open (a worker keeps it
    for its life); EnvironmentFault when a run holds it exclusively."""
    file = _open_lock(run_dir / name)
    if not _lock(file, fcntl.LOCK_SH):
        holder = _holder(run_dir / name)
        file.close()
        raise EnvironmentFault(f"run directory {run_dir} is in use by another dsgraph run{holder}")
    return file


def _lock(file: IO[str], kind: int) -> bool:
    """False when another process holds it; an EnvironmentFault when the file system has no locks
    (a run directory left unguarded is worse than one refused)."""
    try:
        fcntl.flock(file, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        file.close()
        raise EnvironmentFault(
            f"cannot lock run directory {Path(file.name).parent}: {describe(error)}; "
            "its file system does not support flock"
        ) from None
    return True


def _open_lock(path: Path) -> IO[str]:
    """The lock file, never through a link: the driver rewrites it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise EnvironmentFault(f"{path} is a symbolic link; remove it to use run directory {path.parent}") from None
        raise EnvironmentFault(f"cannot lock run directory {path.parent}: {describe(error)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EnvironmentFault(f"{path} is not a plain file; remove it to use run directory {path.parent}")
    return os.fdopen(fd, "r+", encoding="utf-8")


def open_new(path: Path, read: bool = False) -> BinaryIO:
    """A new plain file at `path`, for writing (and reading, with `read`): what was there (a file,
    a link) is removed first, and a link is never followed, so that nothing planted in a run
    directory redirects a write elsewhere."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.fdopen(os.open(path, flags, 0o644), "r+b" if read else "wb")


def write_new(path: Path, data: str | bytes) -> None:
    """`data` into a new plain file at `path` (see open_new)."""
    with open_new(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)


def open_existing(path: Path) -> BinaryIO:
    """A plain file this run made, for reading and writing in place, never through a link."""
    return os.fdopen(os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), "r+b")


def _holder(path: Path) -> str:
    """`(pid 1234: dsgraph run p.dsg)` of the driver that holds the lock, when it wrote so and is
    alive; the ranks of an external launcher's job hold it without writing who they are."""
    import psutil

    try:
        holder: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except OSError:  # another user's run: its lock file is private
        return ""
    except ValueError:
        holder = {}
    try:
        command = " ".join(str(part) for part in holder["command"])
        if psutil.pid_exists(int(holder["pid"])):
            return f" (pid {holder['pid']}: {command})"
    except (KeyError, TypeError, ValueError):
        pass
    return " (the ranks of a job started by an external launcher?)"
