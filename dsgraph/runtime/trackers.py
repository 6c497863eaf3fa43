"""Experiment trackers (TensorBoard, MLflow, W&B), each writing its files under the run directory.

Rank 0 creates one `Trackers`, logs each step's values through it and closes it when the run ends.
The work is done by Accelerate's own tracker classes, used without an Accelerator. Nothing leaves
the machine:

- TensorBoard: event files in RUN_DIR/tensorboard/ (the hyperparameters in a timestamped
  subdirectory of it, as `SummaryWriter.add_hparams` writes them);
- MLflow: a local file store in RUN_DIR/mlruns (tracking URI `file://` + its absolute path, set
  explicitly; MLflow's telemetry is off), names as `mlflow_key` makes them (`train/kd.kl`);
- W&B: an offline run in RUN_DIR/wandb/offline-run-*/ (no login, no console capture, no system
  stats, code, git or requirements; error reporting off), the log of its service process in
  RUN_DIR/wandb/logs/ unless WANDB_CACHE_DIR is set; `wandb sync` uploads the run later.

Setting up MLflow and W&B sets a few of their environment variables in this process (see `_ENV`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any

from dsgraph import catalogue

TRACKERS = catalogue.TRACKERS
# tracker -> (the module it needs, the pip package that provides it)
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "wandb": ("wandb", "wandb"),
}
# Set before the package is imported: MLflow reads its telemetry switch on import.
_ENV = {
    # MLflow 3 (3.18 here) refuses its file store, "in maintenance mode", unless this is set.
    "mlflow": {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"},
    "wandb": {"WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"},
}

Scalar = bool | int | float | str


def missing_packages(names: Iterable[str]) -> list[tuple[str, str]]:
    """(tracker, pip package) for each named tracker whose package is not installed; imports nothing."""
    missing = []
    for name in names:
        if name not in _PACKAGES:
            raise ValueError(f"unknown tracker `{name}`; known: {', '.join(TRACKERS)}")
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            missing.append((name, package))
    return missing


def flatten(params: Mapping[str, Any], sep: str = "/") -> dict[str, Scalar]:
    """Nested mappings (and lists holding mappings or lists) as one level of `a/b/0/c` keys. A leaf
    that is not a bool, int, float or str (None, an empty container, a list of scalars) becomes
    its JSON text."""
    flat: dict[str, Scalar] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, Enum):
            value = value.value
        if isinstance(value, Mapping) and value:
            for k, v in value.items():
                walk(f"{key}{sep}{k}", v)
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping | list | tuple) for v in value):
            for i, v in enumerate(value):
                walk(f"{key}{sep}{i}", v)
        elif isinstance(value, bool | str):
            flat[key] = value
        elif isinstance(value, int | float):  # also numpy's and torch's numbers
            flat[key] = int(value) if isinstance(value, int) else float(value)
        else:
            flat[key] = json.dumps(value, default=str)

    for key, value in params.items():
        walk(str(key), value)
    return flat


@functools.lru_cache(maxsize=4096)
def mlflow_key(name: str) -> str:
    """`name` as an MLflow key. Its file store keeps each key as a file path, where `train/kd` and
    `train/kd/kl` cannot both exist: the first `/` stays (MLflow's UI groups by it), later ones
    become `.` (`train/kd.kl`); characters MLflow refuses become `_`; cut to its longest key."""
    parts = ["".join(c if c.isalnum() or c in "_-. " else "_" for c in part) for part in name.split("/")]
    parts = [part for part in parts if part not in ("", ".", "..")] or ["_"]
    key = parts[0] + ("/" + ".".join(parts[1:]) if len(parts) > 1 else "")
    return key[: importlib.import_module("mlflow.utils.validation").MAX_ENTITY_KEY_LENGTH]


def mlflow_params(flat: Mapping[str, Scalar]) -> dict[str, str]:
    """`flat` as MLflow takes parameters: `mlflow_key` keys, values as text cut to its longest
    parameter value (Accelerate's MLflowTracker would drop a longer one)."""
    longest = importlib.import_module("mlflow.utils.validation").MAX_PARAM_VAL_LENGTH
    return {mlflow_key(key): str(value)[:longest] for key, value in flat.items()}


class _PlainLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Stands in for Accelerate's tracking logger, which refuses to log before an Accelerator
    (or `PartialState`) exists in the process."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("main_process_only", None)
        kwargs.pop("in_order", None)
        self.logger.log(level, msg, *args, **kwargs)

    def warning_once(self, msg: object, *args: Any, **kwargs: Any) -> None:
        self.log(logging.WARNING, msg, *args, **kwargs)


@contextmanager
def _accelerate_logging() -> Iterator[None]:
    import accelerate.tracking
    from accelerate.state import PartialState

    if PartialState._shared_state:  # an Accelerator exists: its logger works as it is
        yield
        return
    saved = accelerate.tracking.logger
    accelerate.tracking.logger = _PlainLogger(saved.logger, {})
    try:
        yield
    finally:
        accelerate.tracking.logger = saved


class Trackers:
    """The named trackers of one run, started on creation with `params` logged as the run's
    hyperparameters (flattened, `a/b` keys). Create it on rank 0 only."""

    def __init__(
        self, names: tuple[str, ...], run_dir: Path, run_name: str, params: Mapping[str, Any], project: str = "dsgraph"
    ) -> None:
        missing = missing_packages(names)
        if missing:
            raise ModuleNotFoundError(
                "; ".join(
                    f"tracker `{name}` needs the package {package}: pip install {package}" for name, package in missing
                )
            )
        self.run_dir = run_dir.resolve()
        self._trackers: list[Any] = []
        flat = flatten(params)
        try:
            for name in dict.fromkeys(names):
                os.environ.update(_ENV.get(name, {}))
                tracker, values = self._create(name, run_name, project, flat)
                self._call(tracker.start)
                self._trackers.append(tracker)
                self._call(tracker.store_init_configuration, values)
        except BaseException:
            self.close(failed=True)
            raise

    def _create(self, name: str, run_name: str, project: str, flat: dict[str, Scalar]) -> tuple[Any, Mapping[str, Any]]:
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        tracker: Any
        if name == "tensorboard":  # writes to logging_dir/run_name
            tracker = TensorBoardTracker("tensorboard", self.run_dir)
            values: Mapping[str, Any] = flat
        elif name == "mlflow":
            importlib.import_module("mlflow").set_tracking_uri((self.run_dir / "mlruns").as_uri())  # file:///...
            tracker = MLflowTracker(experiment_name=project, run_name=run_name)
            # MLflowTracker lets MLFLOW_EXPERIMENT_NAME/RUN_ID/TAGS/NESTED_RUN override its arguments.
            tracker.experiment_name, tracker.run_id, tracker.tags, tracker.nested_run = project, None, None, False
            values = mlflow_params(flat)
        else:
            wandb = importlib.import_module("wandb")
            settings = wandb.Settings(
                console="off",
                silent=True,
                save_code=False,
                disable_code=True,
                disable_git=True,
                x_disable_stats=True,
                x_disable_machine_info=True,
                x_save_requirements=False,
            )
            # wandb-core logs to WANDB_CACHE_DIR/wandb/logs/ (~/.cache/wandb/logs/ by default); wandb.init
            # makes dir/wandb/offline-run-*/.
            os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir))
            tracker = WandBTracker(project, name=run_name, dir=str(self.run_dir), mode="offline", settings=settings)
            values = flat
        tracker.main_process_only = False  # the caller is rank 0; never touch PartialState
        return tracker, values

    @staticmethod
    def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with _accelerate_logging():
            return method(*args, **kwargs)

    @property
    def names(self) -> tuple[str, ...]:
        """The trackers running."""
        return tuple(tracker.name for tracker in self._trackers)

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Log `values` at `step`, names such as `train/kd` or `lr/student` as given (MLflow's as
        `mlflow_key` makes them)."""
        numbers = {key: float(value) for key, value in values.items()}
        for tracker in self._trackers:
            named = {mlflow_key(k): v for k, v in numbers.items()} if tracker.name == "mlflow" else numbers
            self._call(tracker.log, named, step=step)

    def close(self, failed: bool = False) -> None:
        """Finish every tracker, so that its files are complete: the MLflow run ends FINISHED (or
        FAILED), the W&B run exits 0 (or 1). Never raises: a tracker that fails to finish is named
        on stderr. Closing again does nothing."""
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                if failed and tracker.name == "mlflow":
                    importlib.import_module("mlflow").end_run(status="FAILED")
                elif failed and tracker.name == "wandb":
                    tracker.run.finish(exit_code=1)
                else:
                    self._call(tracker.finish)
                if tracker.name == "wandb":  # finish() returns before wandb-core has written the .wandb file
                    importlib.import_module("wandb").teardown()
            except Exception as error:
                print(f"dsgraph: closing the {tracker.name} tracker failed: {error!r}", file=sys.stderr)

    def __enter__(self) -> Trackers:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(failed=error is not None)
