"""The experiment trackers (dsgraph/runtime/trackers.py): values written through `Trackers` are read
back from the run directory with each backend's own reader."""

import builtins
import enum
import json
import struct
from pathlib import Path

import pytest

from dsgraph.runtime import trackers
from dsgraph.runtime.trackers import Trackers, flatten, missing_packages, mlflow_key, mlflow_params

STEPS = {
    1: {"train/kd": 2.5, "train/kd/kl": 1.25, "lr/student": 1e-3},
    2: {"train/kd": 2.0, "train/kd/kl": 1.0, "lr/student": 5e-4, "eval/kd": 3.0},
    3: {"train/kd": 1.5, "train/kd/kl": 0.75, "lr/student": 2.5e-4},
}


class Zero(enum.Enum):
    THREE = 3


# A resolved plan, shaped like plan.json: nested, with lists, None, an enum and a long text.
PARAMS = {
    "pipeline": "distill",
    "world_size": 2,
    "models": {"student": {"zero": Zero.THREE, "lr": 1e-4, "trained": True, "lora": None, "fills": ["lr", "bs"]}},
    "losses": {"kd": {"weight": 1.0}, "kd/kl": {"weight": 0.5}},
    "steps": [{"kind": "forward", "id": "student#1"}, {"kind": "loss", "id": "kd"}],
    "source": "x" * 7000,
    "wide": {f"k{i}": i for i in range(150)},  # more than MLflow takes in one batch
}


@pytest.fixture(autouse=True)
def restored_env(monkeypatch):
    """Trackers sets MLflow's and W&B's environment variables: give them back after each test."""
    for key in [*(k for env in trackers._ENV.values() for k in env), "WANDB_CACHE_DIR"]:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)


def expected(name):
    return [(step, values[name]) for step, values in STEPS.items() if name in values]


def write(names, run_dir, params=PARAMS):
    with Trackers(names, run_dir, "run-1", params) as tracked:
        assert tracked.names == names
        for step, values in STEPS.items():
            tracked.log(values, step)


def test_missing_packages_imports_nothing(monkeypatch):
    real_import = builtins.__import__

    def no_tracker_imports(name, *args, **kwargs):
        assert name.partition(".")[0] not in ("tensorboard", "mlflow", "wandb"), f"imported {name}"
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tracker_imports)
    assert missing_packages(trackers.TRACKERS) == []
    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name: None if name in ("mlflow", "wandb") else real_find_spec(name)
    )
    assert missing_packages(["tensorboard", "mlflow", "wandb"]) == [("mlflow", "mlflow-skinny"), ("wandb", "wandb")]
    with pytest.raises(
        ModuleNotFoundError, match=r"tracker `mlflow` needs the package mlflow-skinny: pip install mlflow-skinny"
    ):
        Trackers(("tensorboard", "mlflow"), Path("unused"), "run-1", {})
    with pytest.raises(ValueError, match="unknown tracker `comet`"):
        missing_packages(["comet"])


def test_params_fit_each_backend():
    flat = flatten(PARAMS)
    assert flat["models/student/zero"] == 3 and flat["models/student/trained"] is True
    assert flat["models/student/lora"] == "null" and flat["models/student/fills"] == '["lr", "bs"]'
    assert flat["steps/1/id"] == "kd" and flat["losses/kd/kl/weight"] == 0.5
    assert all(type(v) in (bool, int, float, str) for v in flat.values())  # what TensorBoard's hparams take

    validation = pytest.importorskip("mlflow.utils.validation")
    params = mlflow_params({**flat, "k" * 300: 1, "odd#name:/x": 2})
    assert len(params) == len(flat) + 2
    assert params["source"] == "x" * validation.MAX_PARAM_VAL_LENGTH
    assert params["k" * validation.MAX_ENTITY_KEY_LENGTH] == "1"
    assert params["odd_name_/x"] == "2"
    # The file store keeps keys as paths: `kd` and `kd/kl` must not be a file and a folder.
    assert (
        mlflow_key("losses/kd/weight") == "losses/kd.weight"
        and mlflow_key("losses/kd/kl/weight") == "losses/kd.kl.weight"
    )
    assert mlflow_key("train/kd/kl") == "train/kd.kl" and mlflow_key("a//b/../c") == "a/b.c"
    for key in params:
        validation._validate_param_name(key)


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    write(("tensorboard",), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for name in ("train/kd", "train/kd/kl", "lr/student", "eval/kd"):
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in expected(name)], name
        assert [v for _, v in got] == pytest.approx([v for _, v in expected(name)]), name

    (hparams_dir,) = [p for p in (tmp_path / "tensorboard").iterdir() if p.is_dir() and any(p.glob("events.*"))]
    run = EventAccumulator(str(hparams_dir))
    run.Reload()
    content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["pipeline"].string_value == "distill"
    assert hparams["models/student/zero"].number_value == 3
    assert hparams["models/student/fills"].string_value == '["lr", "bs"]'
    assert len(hparams["source"].string_value) == 7000
    assert len(hparams) == len(flatten(PARAMS))


def test_mlflow_store_read_back(tmp_path):
    pytest.importorskip("mlflow")
    write(("mlflow",), tmp_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dsgraph").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    for name in ("train/kd", "train/kd/kl", "lr/student", "eval/kd"):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, mlflow_key(name)))
        assert got == expected(name), name  # float64 end to end
    assert run.data.params == mlflow_params(flatten(PARAMS))  # all 160-odd, over two batches
    assert run.data.params["models/student.zero"] == "3"


def test_a_failed_run_is_closed_as_failed(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    with pytest.raises(OSError):  # TensorBoard cannot start: MLflow, started first, is ended
        Trackers(("mlflow", "tensorboard"), tmp_path, "run-1", {"a": 1})
    assert mlflow.active_run() is None

    with pytest.raises(RuntimeError, match="boom"), Trackers(("mlflow",), tmp_path, "run-2", {"a": 1}) as tracked:
        tracked.log({"train/kd": 1.0}, 1)
        raise RuntimeError("boom")
    tracked.close()  # again: nothing left to close
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("dsgraph").experiment_id])
    assert {(r.info.run_name, r.info.status) for r in runs} == {("run-1", "FAILED"), ("run-2", "FAILED")}
    (run_2,) = [r for r in runs if r.info.run_name == "run-2"]
    assert run_2.data.metrics == {"train/kd": 1.0}


def wandb_records(path: Path):
    """The records of a W&B .wandb file: a 7-byte header (`:W&B`, magic, version), then LevelDB's log
    format (32 KiB blocks of chunks: CRC32C, length, type, data), each record a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset = [], b"", 7
    while offset + 7 <= len(data):
        block_left = 32768 - offset % 32768
        if block_left < 7:  # too little room for a chunk header: padding
            offset += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
        elif kind == 0:  # zero padding
            break
    return records


@pytest.mark.spawns  # wandb.init starts its service process (wandb-core), offline too
def test_wandb_offline_run_read_back(tmp_path):
    pytest.importorskip("wandb")
    write(("wandb",), tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    assert (run_dir / "logs" / "debug.log").exists()
    assert list((tmp_path / "wandb" / "logs").glob("core-debug-*.log"))  # not in ~/.cache/wandb
    records = wandb_records(log)

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items.pop("_step")] = items
    for step, values in STEPS.items():
        assert {k: v for k, v in history[step].items() if not k.startswith("_")} == pytest.approx(values), step

    config = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    assert {k: v for k, v in config.items() if not k.startswith("_")} == flatten(PARAMS)

    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "run-1" and run.project == "dsgraph"
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0
