"""`engine = native | accelerate`: the same pipeline forced through native deepspeed.initialize
engines and through Accelerate's prepare trains bit-identically, and the plan says the engine was
forced rather than chosen. `zero_init = false`: a ZeRO-3 model built whole and partitioned by
prepare trains as one built under zero.Init."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from replica import load_plan, replicate
from test_runtime import ROOT, dsgraph_run

pytestmark = pytest.mark.runtime
STEPS = 8


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    runs = {}
    for engine in ("accelerate", "native"):
        sets = [f"steps={STEPS}", f"student.engine={engine}", f"teacher.engine={engine}"]
        run_dir = tmp_path_factory.mktemp(engine) / "run"
        done = dsgraph_run(ROOT / "pipelines" / "distill.dsg", run_dir, *sets)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[engine] = run_dir
        plan = load_plan(run_dir)
        expected = "deepspeed" if engine == "native" else "accelerate"
        assert plan.groups[0].engine.value == expected and plan.groups[0].forced
        assert plan.frozen is not None and plan.frozen.engine.value == expected and plan.frozen.forced
        calls = {c[0] for c in json.loads((run_dir / "ranks" / "rank0.json").read_text())["backend_calls"]}
        assert ("initialize" in calls) == (engine == "native") and ("prepare" in calls) == (engine != "native")
    return runs


def test_distillation_forced_native_and_accelerate_train_bit_identically(runs):
    accelerate, native = (_train_rows(runs[e]) for e in ("accelerate", "native"))
    assert [r["losses"] for r in accelerate] == [r["losses"] for r in native]  # bit for bit
    assert [r["terms"] for r in accelerate] == [r["terms"] for r in native]


def test_a_zero3_teacher_built_whole_trains_as_one_built_under_zero_init(runs, tmp_path):
    run_dir = tmp_path / "run"
    done = dsgraph_run(ROOT / "pipelines" / "distill.dsg", run_dir, f"steps={STEPS}", "teacher.zero_init=false")
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = load_plan(run_dir).model("teacher")
    assert teacher.built_whole and not teacher.zero_init
    report = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    local, total = report["shards"]["teacher"]
    assert 0 < local < total  # partitioned by prepare
    whole = _train_rows(run_dir)
    assert [r["losses"] for r in whole] == [r["losses"] for r in _train_rows(runs["accelerate"])]


def test_a_client_optimizer_from_a_factory_trains_as_its_replica(tmp_path):
    """`optimizer = myopt:make(lr=..., momentum=...)`: the factory's torch optimizer, wrapped by
    DeepSpeed as a client optimizer (the config has no "optimizer" block), with the config's
    warm-up schedule on top; the losses equal a plain PyTorch replica's."""
    shutil.copytree(ROOT / "pipelines" / "configs", tmp_path / "configs")
    factory = "def make(params, lr, momentum):\n    return torch.optim.SGD(params, lr=lr, momentum=momentum)\n"
    (tmp_path / "myopt.py").write_text("import torch\n\n\n" + factory)
    text = (ROOT / "pipelines" / "distill.dsg").read_text()
    text = text.replace(
        "optimizer = adamw(lr=5e-3, weight_decay=0.01)", "optimizer = myopt:make(lr=0.05, momentum=0.9)"
    )
    (tmp_path / "client.dsg").write_text(text)
    run_dir = tmp_path / "run"
    done = dsgraph_run(tmp_path / "client.dsg", run_dir, f"steps={STEPS}")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = load_plan(run_dir)
    student = plan.model("student")
    assert student.client_optimizer is not None and "optimizer" not in student.deepspeed_config
    expected = replicate(plan, world=2)
    for step, (got, want) in enumerate(zip(_train_rows(run_dir), expected, strict=True), 1):
        assert got["losses"]["kd"] == pytest.approx(want["kd"], abs=1e-5), step


def test_zero3_with_optimizer_and_parameter_offload_trains_as_its_replica_and_as_estimated(tmp_path):
    """shared_loss.dsg's ZeRO-3 model with its optimizer and its parameters offloaded to the CPU
    (`offload_optimizer = cpu  offload_param = cpu`): the losses equal the plain replica's, and in
    each category the estimate's device plus host bytes equal what each rank holds (on a CPU the
    host is the device: the offload moves nothing, so the two are measured together)."""
    from dsgraph.dsconfig import estimate as memory
    from dsgraph.runtime.meta import count_plan

    run_dir = tmp_path / "run"
    zero = (
        "right.zero={ stage = 3  stage3_param_persistence_threshold = 0  offload_optimizer = cpu  offload_param = cpu }"
    )
    done = dsgraph_run(ROOT / "pipelines" / "shared_loss.dsg", run_dir, f"steps={STEPS}", zero)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = load_plan(run_dir)
    offload = plan.model("right").deepspeed_config["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    for step, (got, want) in enumerate(zip(_train_rows(run_dir), replicate(plan, world=2), strict=True), 1):
        assert got["losses"]["total"] == pytest.approx(want["total"], abs=1e-5), step
    est = {m.name: m for m in memory.estimate(plan, count_plan(plan), 2).models}
    assert est["right"].host["params"] > 0 and est["right"].host["optimizer_states"] > 0
    for rank in range(2):
        measured = json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())["memory"]["right"]
        for category in ("params", "grads", "optimizer_states"):
            want = getattr(est["right"], category) + est["right"].host.get(category, 0)
            assert abs(measured[category] - want) <= 0.1 * want, (rank, category, measured[category], want)
