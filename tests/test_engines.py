"""`engine = native | accelerate`: the same pipeline forced through native deepspeed.initialize
engines and through Accelerate's prepare trains bit-identically, and the plan says the engine was
forced rather than chosen. `zero_init = false`: a ZeRO-3 model built whole and partitioned by
prepare trains as one built under zero.Init."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replica import load_plan
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
