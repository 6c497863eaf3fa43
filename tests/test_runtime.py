"""Real 2-process DeepSpeed runs on CPU (no mocks): every shipped pipeline trains, matches a plain
single-process PyTorch replica, and keeps the promises of the plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsgraph.runtime.launch import _free_port
from replica import load_plan, replicate
from test_memory import assert_estimate_holds

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
STEPS = 6
pytestmark = pytest.mark.runtime


def dsgraph_run(
    pipeline: Path, run_dir: Path, *sets: str, timeout: int = 600, procs: int = 2
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "dsgraph",
        "run",
        str(pipeline),
        "--procs",
        str(procs),
        "--run-dir",
        str(run_dir),
        "--set",
        "log_every=1",
        *[a for s in sets for a in ("--set", s)],
    ]
    environment = dict(os.environ, DSGRAPH_RECORD_SAMPLES="1")
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def all_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """The training rows (evaluation rows say `"split": "eval"`)."""
    return [r for r in all_rows(run_dir) if r["split"] == "train"]


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]


def _shipped(name: str, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp(name) / "run"
    done = dsgraph_run(Path("pipelines") / f"{name}.dsg", run_dir, f"steps={STEPS}")
    assert done.returncode == 0, done.stderr[-3000:]
    return name, run_dir, done


@pytest.fixture(scope="module")
def distill_shipped(tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    return _shipped("distill", tmp_path_factory)


@pytest.fixture(scope="module")
def distill_run(distill_shipped) -> Path:
    """pipelines/distill.dsg, STEPS steps: one run that several tests read."""
    return distill_shipped[1]


@pytest.fixture(scope="module", params=["distill", "disjoint", "shared_loss"])
def shipped_run(request, tmp_path_factory):
    if request.param == "distill":
        return request.getfixturevalue("distill_shipped")
    return _shipped(request.param, tmp_path_factory)


def test_runs_to_completion_and_leaves_its_files(shipped_run):
    name, run_dir, done = shipped_run
    plan = load_plan(run_dir)
    assert plan.pipeline == name and plan.settings.steps == STEPS
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    for model in (m for m in plan.models if m.trained):
        exported = run_dir / "models" / model.name / "model.safetensors"
        assert exported.is_file()
        from safetensors.torch import load_file

        weights = load_file(str(exported))
        assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not shards
    assert f"done: {name}" in done.stdout


def test_losses_equal_a_single_process_pytorch_replica(shipped_run):
    _, run_dir, _ = shipped_run
    plan = load_plan(run_dir)
    expected = replicate(plan, world=2)
    actual = [m["losses"] for m in metrics(run_dir)]
    assert len(actual) == len(expected) == STEPS
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        assert a.keys() == e.keys()
        for loss in a:
            assert abs(a[loss] - e[loss]) < 1e-5, (step, loss, a[loss], e[loss])
    first, last = actual[0], actual[-1]
    assert any(last[k] < first[k] for k in first), "training moved the losses"


def test_memory_estimate_is_within_10_percent_of_what_each_rank_holds(shipped_run):
    _, run_dir, _ = shipped_run
    assert_estimate_holds(run_dir)


_ENGINE_STEPS = ("init_process_group", "create_accelerator", "select_plugin", "build_model", "prepare", "initialize")


def assert_ranks_executed_the_plan(run_dir: Path) -> None:
    """The setup steps and the ops of a training step each rank executed, in order, are the
    plan's lists, op by op, the optimizer step included (and the precompute phase's steps); and
    the backend was asked for exactly the engine steps of the setup (then the releases of the
    precompute phase), in that order. Held for every shipped pipeline (the language
    models' in tests/test_lm.py)."""
    plan = load_plan(run_dir)
    setup = [{"id": s.id, "kind": s.kind} for s in plan.setup]
    ops = [{"id": op.id, "kind": op.kind} for op in plan.step] * plan.settings.grad_accum
    assert "optimizer_step" in {op["kind"] for op in ops}
    engine_calls = [(s.kind, getattr(s, "model", None)) for s in plan.setup if s.kind in _ENGINE_STEPS]
    precompute = [{"id": s.id, "kind": s.kind} for s in plan.precompute.steps] if plan.precompute else []
    engine_calls += [("release", name) for name in (plan.precompute.released if plan.precompute else ())]
    for report in ranks(run_dir):
        assert report["executed"] == setup
        assert report["executed_precompute"] == precompute
        assert report["executed_step"] == ops
        assert [tuple(c) for c in report["backend_calls"]] == engine_calls


def test_each_rank_executes_the_printed_plan_step_by_step(shipped_run):
    _, run_dir, _ = shipped_run
    assert_ranks_executed_the_plan(run_dir)


def test_ranks_see_disjoint_samples(shipped_run):
    _, run_dir, _ = shipped_run
    reports = ranks(run_dir)
    for data in reports[0]["samples"]:
        seen = [{i for batch in r["samples"][data] for i in batch} for r in reports]
        assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_zero3_models_are_split_across_ranks(shipped_run):
    _, run_dir, _ = shipped_run
    plan = load_plan(run_dir)
    reports = ranks(run_dir)
    for model in plan.models:
        local = [r["shards"][model.name][0] for r in reports]
        total = reports[0]["shards"][model.name][1]
        if model.zero_init:
            assert all(0 < n < total for n in local) and sum(local) >= total, (model.name, local, total)
        else:
            assert local == [total, total]


def test_frozen_teacher_is_bit_identical_after_training(distill_run, tmp_path):
    run_dir = distill_run
    from dsgraph.runtime.executor import model_seed, state_digest
    from dsgraph.runtime.builtins import mlp

    plan = load_plan(run_dir)
    teacher = plan.model("teacher")
    torch.manual_seed(model_seed(plan.settings.seed, "teacher"))
    built = mlp(**dict(teacher.source.args))
    assert ranks(run_dir)[0]["frozen_digests"]["teacher"] == state_digest(built.state_dict())
    # Same seed, same losses: a second run writes the same metrics.
    again = tmp_path / "again"
    assert dsgraph_run(Path("pipelines") / "distill.dsg", again, f"steps={STEPS}").returncode == 0
    assert [m["losses"] for m in metrics(run_dir)] == [m["losses"] for m in metrics(again)]


def test_a_pipeline_built_only_from_factories_runs(tmp_path):
    run_dir = tmp_path / "run"
    done = dsgraph_run(FIXTURES / "factory_only.dsg", run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_executed_the_plan(run_dir)  # built, and measured, before its Accelerator
    plan = load_plan(run_dir)
    expected = replicate(plan, world=2)
    actual = [m["losses"]["fit"] for m in metrics(run_dir)]
    assert max(abs(a - e["fit"]) for a, e in zip(actual, expected, strict=True)) < 1e-5


def test_a_failing_factory_on_one_rank_ends_the_run_quickly(tmp_path):
    start = time.perf_counter()
    done = dsgraph_run(FIXTURES / "failing_factory.dsg", tmp_path / "run", timeout=120)
    elapsed = time.perf_counter() - start
    assert done.returncode == 1
    assert "rank 1 failed in setup step" in done.stderr and "build_model bad" in done.stderr
    assert "failing_factory.dsg:6:5" in done.stderr  # the model's .dsg line
    assert "this factory fails on rank 1" in done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 60


def test_a_wrong_file_stops_before_any_worker_starts(tmp_path):
    bad = tmp_path / "bad.dsg"
    bad.write_text(
        (ROOT / "pipelines" / "distill.dsg").read_text().replace("train student on kd", "train teacher on kd")
    )
    start = time.perf_counter()
    done = dsgraph_run(bad, tmp_path / "run")
    assert done.returncode == 1 and "DSG301" in done.stderr
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - start < 10


def test_set_overrides_are_checked_like_the_file(tmp_path):
    done = dsgraph_run(Path("pipelines") / "distill.dsg", tmp_path / "run", "steps=forty", "student.optimizer.lrr=1")
    assert done.returncode == 1
    assert "--set[2]:1:7: error[DSG203]" in done.stderr
    assert "DSG204" in done.stderr


def test_dsgraph_deals_batches_in_the_order_of_accelerates_prepared_dataloader(tmp_path):
    from dsgraph.runtime.env import worker_environment

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(ROOT / "tests" / "scripts" / "accelerate_order.py"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=worker_environment(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["world"] == 2
        assert result["actual"] == result["expected"] and len(result["expected"]) == 3 * 6
    assert not {i for b in results[0]["actual"][:6] for i in b} & {i for b in results[1]["actual"][:6] for i in b}


def test_frozen_models_are_not_saved_in_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    done = dsgraph_run(Path("pipelines") / "distill.dsg", run_dir, "steps=4", "checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["manifests", "student"]
    manifest = json.loads((run_dir / "ckpt" / "manifests" / "step-00000004.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["student"]
    assert manifest["identity"]["models"]["teacher"]["role"] == "frozen"


def test_hugging_face_models_from_a_directory_and_from_a_config(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path / "teacher"
    )
    pipeline = tmp_path / "lm.dsg"
    pipeline.write_text("""
    pipeline lm {
        steps = 4
        micro_batch = 4
        data train = builtin.synthetic_tokens(samples=64, length=12, vocab=64)
        model teacher = hf("teacher") { zero = { stage = 3  stage3_param_persistence_threshold = 0 }  frozen }
        model student = hf(config={ model_type = "gpt2"  vocab_size = 64  n_positions = 16  n_embd = 16
                                    n_layer = 1  n_head = 2 }) {
            zero = { stage = 2 }
            optimizer = adamw(lr=1e-3)
        }
        loss kd = kl(student(train.input_ids, attention_mask=train.attention_mask).logits,
                     teacher(train.input_ids, attention_mask=train.attention_mask).logits, temperature=2.0)
        train student on kd
    }
    """)
    run_dir = tmp_path / "run"
    done = dsgraph_run(pipeline, run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    local, total = ranks(run_dir)[0]["shards"]["teacher"]
    assert 0 < local < total  # partitioned as it loaded
    assert (run_dir / "models" / "student" / "config.json").is_file()  # save_pretrained
    assert "Loading weights" not in done.stderr


def test_factory_models_get_bucket_sizes_measured_on_the_model(tmp_path):
    run_dir = tmp_path / "run"
    assert dsgraph_run(FIXTURES / "factory_only.dsg", run_dir, "steps=1").returncode == 0
    config = json.loads((run_dir / "deepspeed_configs" / "reg.json").read_text())
    assert config["zero_optimization"]["reduce_bucket_size"] == 16 * 16  # widest layer of the regressor


def test_the_compiler_and_the_runtime_know_the_same_builtins():
    from dsgraph import catalogue
    from dsgraph.runtime import builtins
    import inspect

    for known, implemented in (
        (catalogue.MODELS, builtins.MODELS),
        (catalogue.DATA, builtins.DATA),
        (catalogue.LOSSES, builtins.LOSSES),
    ):
        assert set(known) == set(implemented)
        for name, spec in known.items():
            params = list(inspect.signature(implemented[name]).parameters)
            assert [p.name for p in spec.params] == params, name
    assert set(catalogue.REWARDS) == set(builtins.REWARDS)
    for name, spec in catalogue.REWARDS.items():  # called with the prompts and completions first
        params = list(inspect.signature(builtins.REWARDS[name]).parameters)
        assert params[:2] == ["prompts", "completions"]
        assert [p.name for p in spec.params] == params[2:], name
