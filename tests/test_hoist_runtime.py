"""A frozen teacher hoisted out of the loop, on real 2-process DeepSpeed runs (CPU, no mocks): the
cached run gives the live run's losses, the teacher's memory is gone during training (measured,
and as the estimate says), a resumed run reuses the cache and is bit-identical, a changed teacher
is computed again, and a teacher shared by two students is computed once. The language-model
cases (full logits and top-k) are in tests/test_lm.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsgraph.dsconfig import estimate as memory
from dsgraph.runtime.meta import count_plan
from replica import load_plan
from test_memory import assert_estimate_holds
from test_runtime import all_rows, assert_ranks_executed_the_plan, dsgraph_run, ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
pytestmark = pytest.mark.runtime
SETS = (f"steps={STEPS}", "eval_every=10", "checkpoint_every=10")


def _values(run_dir: Path) -> list[dict]:
    """The metrics rows without their timings."""
    timing = {"samples_per_s", "wall_time", "eval_s"}
    return [{k: v for k, v in row.items() if k not in timing} for row in all_rows(run_dir)]


def _run(pipeline: Path, run_dir: Path, *sets: str) -> Path:
    done = dsgraph_run(pipeline, run_dir, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """distill.dsg live, and with its teacher cached in a cache folder outside the run."""
    here = tmp_path_factory.mktemp("hoist")
    shared = here / "shared-cache"
    return {
        "live": _run(ROOT / "pipelines" / "distill.dsg", here / "live", *SETS),
        "cached": _run(
            ROOT / "pipelines" / "distill.dsg",
            here / "cached",
            *SETS,
            "teacher.cache=true",
            f'cache_dir="{shared}"',
        ),
        "shared": shared,
    }


def test_a_cached_teacher_gives_the_live_losses_at_every_step_and_evaluation(runs):
    live, cached = all_rows(runs["live"]), all_rows(runs["cached"])
    assert [(r["split"], r["step"]) for r in live] == [(r["split"], r["step"]) for r in cached]
    assert len(live) == STEPS + 2  # every step logged, two evaluations
    for a, b in zip(live, cached, strict=True):
        for group in ("losses", "terms"):
            for name, value in a[group].items():
                assert abs(value - b[group][name]) < 1e-6, (a["split"], a["step"], name, value, b[group][name])
    assert_ranks_executed_the_plan(runs["cached"])


def test_the_cached_teacher_is_computed_once_per_sample_and_its_memory_is_freed(runs):
    """Every rank took part in every teacher forward of the precompute (4096 training samples in
    batches of 16: 128 per rank; 1000 eval samples: 63 batches, 32 rounds), then the teacher's
    engine was destroyed: its parameters are no longer reachable, and the bytes of all live tensors
    fell by at least what the teacher held, as `compile --memory` estimates."""
    plan = load_plan(runs["cached"])
    est = memory.estimate(plan, count_plan(plan), 2)
    teacher = next(m for m in est.models if m.name == "teacher")
    assert est.released == ("teacher",) and est.training_total == est.total - teacher.total
    for report in ranks(runs["cached"]):
        fills = [(f["data"], f["rows"], f["forwards"], f["reused"]) for f in report["precompute"]]
        assert fills == [("train", 4096, 128, False), ("val", 1000, 32, False)]
        released = report["released"]["teacher"]
        assert released["engine_freed"]
        assert released["live_before"] - released["live_after"] >= released["model"]["total"]
        assert abs(released["model"]["total"] - teacher.total) <= 0.1 * teacher.total
        assert "teacher" not in report["memory"]  # what the loop held
        assert abs(sum(m["total"] for m in report["memory"].values()) - est.training_total) <= 0.1 * est.training_total
    assert_estimate_holds(runs["cached"])
    folders = sorted(p.name for p in runs["shared"].iterdir())
    assert len(folders) == 2 and not any(".partial-" in f for f in folders)


def test_a_run_resumed_with_its_cache_reuses_it_and_is_bit_identical(runs, tmp_path):
    """The cached run as if it had died after its middle checkpoint: the resumed run finds the
    cache complete (no teacher forward) and gives exactly the losses of the uninterrupted run."""
    full = runs["cached"]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "ckpt" / "manifests" / f"step-{STEPS:08d}.json").unlink()  # the last checkpoint never completed
    sets = [*SETS, "log_every=1", "teacher.cache=true", f'cache_dir="{runs["shared"]}"']
    command = [sys.executable, "-m", "dsgraph", "run", str(ROOT / "pipelines" / "distill.dsg"), "--procs", "2"]
    command += ["--resume", str(cut), *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step-{STEPS // 2:08d}" in done.stderr
    assert _values(cut) == _values(full)  # bit-identical, evaluations included
    for report in ranks(cut):
        assert [(f["reused"], f["forwards"]) for f in report["precompute"]] == [(True, 0), (True, 0)]


def test_a_changed_teacher_is_computed_again(runs, tmp_path):
    """Another teacher (a different width) with the same cache folder: its digest differs, so it
    is computed and stored beside the first one's, which stays valid."""
    source = (ROOT / "pipelines" / "distill.dsg").read_text()
    before = "model teacher = builtin.mlp(inputs=32, hidden=[128, 128], outputs=8)"
    assert before in source
    changed = tmp_path / "changed.dsg"
    changed.write_text(source.replace(before, before.replace("[128, 128]", "[64, 64]")))
    shutil.copytree(ROOT / "pipelines" / "configs", tmp_path / "configs")
    run = _run(changed, tmp_path / "run", "steps=2", "teacher.cache=true", f'cache_dir="{runs["shared"]}"')
    for report in ranks(run):
        assert [(f["reused"], f["forwards"] > 0) for f in report["precompute"]] == [(False, True), (False, True)]
    assert len(list(runs["shared"].iterdir())) == 4
    manifests = [json.loads((f / "manifest.json").read_text()) for f in runs["shared"].iterdir()]
    assert sorted(m["data"] for m in manifests) == ["train", "train", "val", "val"]


def test_a_teacher_shared_by_two_students_is_computed_once_per_sample(tmp_path, monkeypatch):
    """tests/fixtures/shared_teacher.dsg: one cached teacher, two students. The teacher's own
    forwards are counted: 60 samples in batches of 8 are 8 batches, 4 rounds of 2 ranks, so 4
    forwards per rank for both students together, and none in the loop."""
    counts = tmp_path / "counts"
    counts.mkdir()
    monkeypatch.setenv("DSGRAPH_TEST_COUNT_DIR", str(counts))
    run = _run(ROOT / "tests" / "fixtures" / "shared_teacher.dsg", tmp_path / "run")
    sizes = [(counts / f"rank{rank}").read_text().split() for rank in range(2)]
    assert sizes == [["8", "8", "8", "8"], ["8", "8", "8", "4"]]  # batches 0, 2, 4, 6 and 1, 3, 5, 7
    assert_ranks_executed_the_plan(run)
    rows = all_rows(run)
    assert rows[-1]["losses"]["la"] < rows[0]["losses"]["la"] and rows[-1]["losses"]["lb"] < rows[0]["losses"]["lb"]
