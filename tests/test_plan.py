"""The plan as a contract: every shipped plan survives its JSON form unchanged and holds together;
a plan of another version, a plan changed after compiling and a file that is no plan are refused;
the runtime's side never imports the compiler's (lark, networkx)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dsgraph import plan as P
from dsgraph.compiler import compile_file
from dsgraph.plan import PLAN_VERSION, Plan, PlanError, lint

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "pipelines").glob("*.dsg"))


def _plan(pipeline: str = "pipelines/distill.dsg", world_size: int | None = 2) -> Plan:
    result = compile_file(ROOT / pipeline, world_size)
    assert result.plan is not None, [d.message for d in result.diagnostics]
    return result.plan


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("world_size", [None, 2])
def test_every_shipped_plan_round_trips_through_json_unchanged(pipeline, world_size):
    plan = _plan(pipeline, world_size)
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan
    assert back.to_json() == text and back.digest == plan.digest
    assert lint(back) == []
    assert json.loads(text)["dsgraph_plan"] == PLAN_VERSION


def test_each_kind_of_step_op_and_expression_has_a_name_of_its_own():
    """The JSON form tells the members of a union apart by their `kind`."""
    for union in (P.SetupStep, P.StepOp, P.Expr):
        kinds = [cls.kind for cls in typing.get_args(union)]
        assert len(kinds) == len(set(kinds)), kinds


def test_a_plan_of_another_version_is_refused_naming_both_versions():
    document = json.loads(_plan().to_json())
    document["dsgraph_plan"] = PLAN_VERSION - 1
    with pytest.raises(PlanError, match=rf"format version {PLAN_VERSION - 1}.* reads version {PLAN_VERSION}"):
        Plan.from_json(json.dumps(document))


def test_a_plan_changed_after_compiling_is_refused():
    document = json.loads(_plan().to_json())
    document["settings"]["steps"] += 1
    with pytest.raises(PlanError, match="digest"):
        Plan.from_json(json.dumps(document))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        "{",
        json.dumps({"dsgraph_plan": PLAN_VERSION}),
        json.dumps({"dsgraph_plan": PLAN_VERSION, "pipeline": 3}),
    ],
)
def test_what_is_no_plan_is_refused(text):
    with pytest.raises(PlanError):
        Plan.from_json(text)


def test_a_wrong_kind_of_value_is_refused():
    document = json.loads(_plan().to_json())
    document["step"][1]["grad_group"] = "zero"
    with pytest.raises(PlanError, match="expected int"):
        Plan.from_json(json.dumps(document))


def test_lint_finds_a_call_read_before_it_is_made_and_a_config_used_before_it_is_complete():
    plan = _plan()
    forwards = [op for op in plan.step if isinstance(op, P.Forward)]
    loss = next(op for op in plan.step if isinstance(op, P.ComputeLoss))
    reordered = tuple(op for op in plan.step if op is not loss)
    reordered = (*reordered[:1], loss, *reordered[1:])  # the loss before the forwards
    problems = lint(dataclasses.replace(plan, step=reordered))
    assert any(f"reads `{forwards[0].call}` before it is called" in p for p in problems), problems
    setup = tuple(s for s in plan.setup if not (isinstance(s, P.CompleteConfig) and s.model == "teacher"))
    problems = lint(dataclasses.replace(plan, setup=setup))
    assert any("`teacher` is built under zero.Init before its config is complete" in p for p in problems), problems
    assert any("the config of `teacher` is not complete yet" in p for p in problems), problems


def test_the_stage_precision_and_zero_init_are_read_off_the_resolved_config():
    plan = _plan()
    teacher, student = plan.model("teacher"), plan.model("student")
    assert teacher.stage is P.ZeroStage.ZERO3 and teacher.zero_init and not teacher.trained
    assert student.stage is P.ZeroStage.ZERO2 and not student.zero_init and student.trained
    changed = dataclasses.replace(
        student,
        deepspeed_config={**student.deepspeed_config, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
    )
    assert changed.stage is P.ZeroStage.ZERO3 and changed.zero_init and changed.precision is P.Precision.BF16


@pytest.mark.spawns
def test_the_runtime_never_imports_lark_or_networkx(tmp_path):
    """A worker reads the plan's JSON and nothing of the compiler: loading and checking a plan with
    the runtime's modules imported leaves lark, networkx and the compiler's stages unimported."""
    from dsgraph.runtime.env import worker_environment

    (tmp_path / "plan.json").write_text(_plan().to_json())
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "import dsgraph.runtime.worker, dsgraph.runtime.executor, dsgraph.runtime.checkpoint\n"
        "from dsgraph.plan import Plan, lint\n"
        f"plan = Plan.from_json(Path({str(tmp_path / 'plan.json')!r}).read_text())\n"
        "assert lint(plan) == [] and plan.model('teacher').zero_init\n"
        "compiler = ('lark', 'networkx', 'dsgraph.compiler', 'dsgraph.syntax', 'dsgraph.graph', 'dsgraph.lower',\n"
        "            'dsgraph.dsconfig', 'dsgraph.checks', 'dsgraph.planner')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in compiler or m.startswith(compiler)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=worker_environment(2), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.spawns
def test_a_worker_refuses_a_changed_plan_before_it_builds_anything(tmp_path):
    document = json.loads(_plan().to_json())
    document["models"][0]["deepspeed_config"]["zero_optimization"]["stage"] = 1
    (tmp_path / "plan.json").write_text(json.dumps(document))
    done = subprocess.run(
        [sys.executable, "-m", "dsgraph.runtime.worker", str(tmp_path), "--run-id", "0" * 16],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    failure = json.loads((tmp_path / "failures" / "rank0.json").read_text())
    assert failure["where"] == "loading the plan" and "digest" in failure["error"], failure
    assert not (tmp_path / "deepspeed_configs").exists()
