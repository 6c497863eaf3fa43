"""Process environment for workers, set before torch and DeepSpeed are imported; and whether this
process was started by an external launcher.

Without CUDA, DeepSpeed must be told to use its CPU accelerator (gloo plus its shared-memory
all-reduce op); with 2 ranks on 2 cores, each rank gets one OpenMP thread. DeepSpeed JIT-builds
that op once (~30-50 s); the build is kept per user, outside any virtual environment, keyed by
the versions that make it valid, and is used from a writable copy (made once, in a private
temporary folder) when it lies on a read-only file system."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from dsgraph.runtime import rundir

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# What may stand above a rank that a launcher started: programs, and modules run with `python -m`.
_LAUNCHER_PROGRAMS = frozenset(
    {"torchrun", "accelerate", "deepspeed", "mpirun", "mpiexec", "orterun", "prterun", "srun", "slurmstepd"}
)
_LAUNCHER_MODULES = frozenset(
    {
        "torch.distributed.run",
        "torch.distributed.launch",
        "accelerate.commands.launch",
        "accelerate.commands.accelerate_cli",
        "deepspeed.launcher.launch",
        "deepspeed.launcher.runner",
    }
)


class LauncherError(ValueError):
    """Launcher variables that do not describe a rank of a running launcher."""


def cuda_available() -> bool:
    """Cheap and torch-free: the driver decides before importing torch."""
    if os.environ.get("DSGRAPH_FORCE_CPU") == "1":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def worker_environment(procs: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the launcher passes to every worker."""
    env = dict(os.environ if base is None else base)
    # The environment's own tools first: a `ninja` of another version on PATH would make
    # DeepSpeed rebuild its op in the same cache on every run.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if not cuda_available():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
        env.setdefault("TORCH_EXTENSIONS_DIR", str(usable_extensions_dir(extensions_dir(env["PATH"]))))
    env.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def extensions_dir(path: str | None = None) -> Path:
    """The per-user cache of DeepSpeed's JIT-built ops, keyed by what makes a build valid: the
    versions of Python, torch and DeepSpeed, the `ninja` that builds it, the environment (its
    include paths are in the compile command: two virtual environments would rebuild each other's
    ops) and the CPU (ops are built with -march=native)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsgraph" / "torch_extensions"
    versions = [f"py{sys.version_info.major}.{sys.version_info.minor}"]
    for package in ("torch", "deepspeed"):
        try:
            versions.append(f"{package}-{metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}-none")
    ninja = shutil.which("ninja", path=path)
    tag = hashlib.sha256(_version_of(ninja).encode()).hexdigest()[:8] if ninja else "noninja"
    where = hashlib.sha256(f"{sys.prefix}\0{_cpu_flags()}".encode()).hexdigest()[:8]
    return root / f"{'-'.join(versions)}-ninja{tag}-env{where}"


def _cpu_flags() -> str:
    """The first processor's feature flags (Linux), which -march=native builds for."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _version_of(program: str) -> str:
    try:
        done = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return program
    return done.stdout.strip() or program


def usable_extensions_dir(cache: Path) -> Path:
    """`cache` when this process can write it (building there is needed once, and torch takes a
    lock file there even to load a built op); else a writable copy of it, made once per user and
    cache in a private temporary folder and reused by later runs."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".probe"):
            return cache
    except OSError:
        pass
    try:
        private = _private_temporary_folder()
        copy = private / cache.name
        if not copy.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=private))
            try:
                if cache.is_dir():
                    # copy2 keeps the modification times: ninja sees the copied build as up to date.
                    shutil.copytree(cache, staging, dirs_exist_ok=True, copy_function=shutil.copy2)
                with contextlib.suppress(OSError):  # atomic; another run may have made it first
                    staging.rename(copy)
                if not copy.is_dir():
                    raise OSError(f"cannot make {copy}")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:  # shutil.Error too: no temporary folder, or no room in it
        # shutil.Error holds (source, target, why) of each file it could not copy.
        failures = error.args[0] if isinstance(error, shutil.Error) and error.args else None
        reason = str(failures[0][-1]) if isinstance(failures, list) and failures else error.strerror or str(error)
        raise rundir.EnvironmentFault(
            f"the op cache {cache} is not writable, and no writable copy of it can be made: {reason}; "
            "set TORCH_EXTENSIONS_DIR to a writable folder"
        ) from None
    print(
        f"dsgraph: the op cache {cache} is not writable; using a copy in {copy}"
        + ("" if any(copy.iterdir()) else " (DeepSpeed builds its op there once, ~30-50 s)"),
        file=sys.stderr,
    )
    return copy


def _private_temporary_folder() -> Path:
    """`$TMPDIR/dsgraph-<uid>`, only this user's (0700, owned by this user): the ops loaded from
    it are code. Another user's folder under that name is never used: the next name
    (`dsgraph-<uid>.1`, ...) that is, or can be made, this user's is, so that later runs find it."""
    base = Path(tempfile.gettempdir()) / f"dsgraph-{os.getuid()}"
    for folder in [base, *(base.with_name(f"{base.name}.{n}") for n in range(1, 10))]:
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            status = folder.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o077:
            return folder
    return Path(tempfile.mkdtemp(prefix="dsgraph-"))


def launcher_rank() -> tuple[int, int] | None:
    """(rank, world size) when an external launcher (torchrun, `accelerate launch`, `deepspeed`,
    mpirun, srun) started this process as one rank of a job; None when no launcher variable is
    set. Variables left over in a shell from another job are refused, not trusted: all of
    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT must be set, consistent, and a
    launcher must stand above this process."""
    present = [name for name in LAUNCHER_VARIABLES if name in os.environ]
    if not present:
        return None
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise LauncherError(
            f"{', '.join(present)} {'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: leftovers from another job? Unset "
            f"{', '.join(present)} to let dsgraph start its own processes"
        )
    try:
        rank, world, local = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise LauncherError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    if not 0 <= rank < world or not 0 <= local < world:
        raise LauncherError(f"RANK={rank}, LOCAL_RANK={local} and WORLD_SIZE={world} do not describe a rank")
    launcher = _launcher_above()
    if launcher is None:
        raise LauncherError(
            f"{', '.join(LAUNCHER_VARIABLES)} are set, but no launcher (torchrun, accelerate launch, "
            "deepspeed, mpirun, srun) started this process: leftovers from another job? Unset them to "
            "let dsgraph start its own processes, or run under a launcher"
        )
    return rank, world


def _launcher_above() -> str | None:
    """The command line of the nearest ancestor that is a launcher, if any."""
    import psutil

    try:
        process = psutil.Process().parent()
        for _ in range(12):
            if process is None:
                return None
            if _is_launcher(process.cmdline()):
                return " ".join(process.cmdline())
            process = process.parent()
    except psutil.Error:
        return None
    return None


def _is_launcher(command: list[str]) -> bool:
    """Whether a command line runs a launcher: the program itself (`torchrun ...`, `srun ...`,
    `slurmstepd: [job]`), the program as a Python script (`python .../bin/torchrun ...`), or a
    launcher module (`python -m torch.distributed.run ...`). A launcher's name anywhere else on the
    line (a file path, an argument) does not count."""
    if not command:
        return False
    program = Path(command[0]).name
    if program.split(":")[0] in _LAUNCHER_PROGRAMS:
        return True
    if not program.startswith("python"):
        return False
    arguments = [a for a in command[1:] if a not in ("-u", "-B", "-E", "-s", "-S", "-O", "-OO")]
    if arguments[:1] == ["-m"]:
        return arguments[1:2] != [] and arguments[1] in _LAUNCHER_MODULES
    return bool(arguments) and Path(arguments[0]).name in _LAUNCHER_PROGRAMS


def prepare_current_process() -> None:
    """For a rank started by an external launcher: the same settings the driver would give."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    prepared = worker_environment(world)
    for key, value in prepared.items():
        os.environ.setdefault(key, value)
    # The environment's own `ninja` first here too: the op cache is keyed by it, and DeepSpeed's
    # build reads PATH; another ninja would rebuild the op (~25 s) at each switch between
    # `dsgraph run` and an external launcher.
    os.environ["PATH"] = prepared["PATH"]


@contextlib.contextmanager
def without_module(name: str) -> Iterator[None]:
    """`import NAME` fails inside (ImportError, as when it is not installed), unless it is loaded
    already; afterwards it imports as usual."""
    hidden = name not in sys.modules
    if hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hidden and sys.modules.get(name, 0) is None:
            del sys.modules[name]
