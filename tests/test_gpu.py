"""What only a CUDA machine can show: the NCCL process group, CUDA RNG state in checkpoints, bf16
engines, the memory estimate against what CUDA allocated, and `zero = auto` sized by the real
device. Real runs with one process per GPU; skipped where there is no CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replica import load_plan, replicate
from test_memory import assert_estimate_holds
from test_reliability import losses, wait_until, workers_of
from test_runtime import dsgraph_run

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.runtime,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def procs() -> int:
    return torch.cuda.device_count()


def run(pipeline: Path, run_dir: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    return dsgraph_run(pipeline, run_dir, *sets, procs=procs())


def ranks(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in range(procs())]


def test_a_shipped_pipeline_trains_on_nccl_and_matches_the_replica(tmp_path):
    run_dir = tmp_path / "run"
    done = run(ROOT / "pipelines" / "distill.dsg", run_dir, "steps=6")
    assert done.returncode == 0, done.stderr[-3000:]
    for report in ranks(run_dir):
        assert report["process_group"] == "nccl"
        assert report["device"].startswith("cuda")
    expected = replicate(load_plan(run_dir), world=procs())  # plain PyTorch on the CPU
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    actual = [r["losses"] for r in rows if r["split"] == "train"]
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        assert abs(a["kd"] - e["kd"]) < 1e-4, (step, a, e)  # CUDA and CPU round differently


def test_the_memory_estimate_holds_against_what_cuda_allocated(tmp_path):
    run_dir = tmp_path / "run"
    done = run(ROOT / "pipelines" / "distill.dsg", run_dir, "steps=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_estimate_holds(run_dir, procs())  # tensor by tensor, on the device
    from dsgraph.dsconfig.estimate import estimate
    from dsgraph.runtime.meta import count_plan

    plan = load_plan(run_dir)
    est = estimate(plan, count_plan(plan), procs())
    for report in ranks(run_dir):
        allocated = report["memory"]["student"]["cuda_allocated"]  # all models, as the student's 2nd step began
        assert est.total <= allocated, (est.total, allocated)


def test_bf16_engines_train(tmp_path):
    run_dir = tmp_path / "run"
    done = run(ROOT / "pipelines" / "shared_loss.dsg", run_dir, "steps=8", "precision=bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((run_dir / "deepspeed_configs" / "left.json").read_text())
    assert config["bf16"] == {"enabled": True}
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r["losses"]["total"] for r in logged if r["split"] == "train"]
    assert all(v == v for v in rows) and rows[-1] < rows[0]  # finite, and training moved it


def test_a_resume_restores_the_cuda_rng_state_bit_identically(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert run(FIXTURES / "resume.dsg", straight).returncode == 0
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsgraph",
            "run",
            str(FIXTURES / "resume.dsg"),
            "--procs",
            str(procs()),
            "--run-dir",
            str(broken),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = broken / "ckpt" / "manifests" / "step-00000008.json"
    wait_until(lambda: manifest.exists() or process.poll() is not None, 300)
    for worker in workers_of(broken):
        worker.kill()
    process.wait(timeout=60)
    assert all("cuda" in rank["rng"] for rank in json.loads(manifest.read_text())["ranks"])
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsgraph",
            "run",
            str(FIXTURES / "resume.dsg"),
            "--procs",
            str(procs()),
            "--resume",
            str(broken),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses(straight), losses(broken)
    for step in range(9, 17):
        assert a[step] == b[step], (step, a[step], b[step])


def test_zero_auto_plans_for_the_real_device():
    from dsgraph.compiler import compile_file

    result = compile_file(FIXTURES / "zero_auto.dsg", procs())
    assert result.plan is not None, [d.message for d in result.diagnostics]
    (model,) = result.plan.models
    assert model.zero_auto and f"free memory of {torch.cuda.get_device_name(0)}" in model.zero_auto
    assert model.stage == 0  # a small model fits a GPU unsharded
