"""Hoisting frozen calls out of the loop, on the compile side and in the cache itself (no run):
what `cache = true | auto` decides and why, the precompute phase and the cache reads in the plan,
the sizes the compiler knows, the top-k KL, and the cache folder's life (complete only once
committed, invalid once the teacher changes)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from dsgraph import plan as P
from dsgraph.compiler import compile_file, compile_source
from dsgraph.render import to_text
from dsgraph.source import SourceFile

ROOT = Path(__file__).resolve().parent.parent


def _plan(pipeline: str, *sets: str, world: int | None = 2) -> P.Plan:
    result = compile_file(ROOT / pipeline, world, tuple(sets))
    assert result.plan is not None, [f"{d.code} {d.message}" for d in result.diagnostics]
    return result.plan


def test_a_cached_teacher_is_read_from_the_cache_and_released_before_the_loop():
    plan = _plan("pipelines/distill.dsg", "teacher.cache=true")
    assert plan.precompute is not None
    fills = [s for s in plan.precompute.steps if isinstance(s, P.FillCache)]
    assert [(f.text, f.data, f.rows, f.bytes) for f in fills] == [
        ("teacher(train.x)", "train", 4096, 4096 * 8 * 4),  # 8 fp32 logits per sample
        ("teacher(val.x)", "val", 1000, 1000 * 8 * 4),  # the evaluation reads the eval set's
    ]
    assert plan.precompute.released == ("teacher",)
    assert not any(isinstance(op, P.Forward) and op.model == "teacher" for op in plan.step)
    reads = [op for op in plan.step if isinstance(op, P.ReadCache)]
    assert [(r.entry, r.data) for r in reads] == [("teacher#1", "train")]
    assert plan.evaluation is not None
    assert [(r.entry, r.data) for r in plan.evaluation.step if isinstance(r, P.ReadCache)] == [("teacher#1", "val")]
    kl = plan.loss("kd").terms[0].expr
    assert isinstance(kl, P.LossCall) and kl.args[1] == P.Cached("teacher#1", kl.args[1].span)
    assert P.lint(plan) == []
    assert P.Plan.from_json(plan.to_json()) == plan  # the contract survives its JSON form
    text = to_text(plan)
    assert "precompute (once, before the loop; cache in RUN_DIR/cache" in text
    assert "release_model  teacher: engine destroyed" in text
    assert "read_cache      teacher#1 (cached rows of train" in text


def test_without_cache_the_plan_is_the_live_one():
    live, off = _plan("pipelines/distill.dsg"), _plan("pipelines/distill.dsg", "teacher.cache=false")
    assert live.precompute is None and live.cache == ()
    assert off.step == live.step


@pytest.mark.parametrize(
    ("sets", "cached", "reason"),
    [
        ((), True, "2.34 passes over the data; 159.25 KiB"),  # 300 steps x 32 samples / 4096
        (("steps=100",), False, "the run reads each sample 0.78 times: nothing to save"),
        (("cache_budget=0.0001",), False, "159.25 KiB exceed `cache_budget = 0.0001` (GiB)"),
    ],
)
def test_cache_auto_hoists_when_the_run_passes_over_the_data_more_than_once_and_the_cache_fits(sets, cached, reason):
    plan = _plan("pipelines/distill.dsg", "teacher.cache=auto", *sets)
    assert [(d.model, d.cached, d.reason) for d in plan.cache] == [("teacher", cached, reason)]
    assert (plan.precompute is not None) is cached


def _compile(text: str, world: int | None = 2):
    return compile_source(SourceFile("pipe.dsg", text), world)


_PIPE = """pipeline p {{
    steps = 40
    micro_batch = 8
    data train = {data}
    model student = builtin.mlp(inputs=4, outputs=2) {{ zero = {{ stage = 2 }}  optimizer = adamw(lr=1e-3) }}
    model teacher = builtin.mlp(inputs=4, outputs=2) {{ zero = {{ stage = 3 }}  frozen  cache = {cache} }}
    loss kd = kl(student(train.x), teacher(train.x)) + kl(student(train.x), teacher(train.x + 1.0))
    train student on kd
}}
"""


def test_cache_auto_says_why_a_factory_data_set_is_not_cached_and_deterministic_true_lets_it():
    result = _compile(_PIPE.format(data="my_project.data:make(samples=64)", cache="auto"))
    assert result.plan is not None and result.plan.precompute is None
    (decision,) = result.plan.cache
    assert decision.reason.startswith("not loop-invariant: reads `train`, a factory's data set")
    declared = "my_project.data:make(samples=64) { deterministic = true }"
    result = _compile(_PIPE.format(data=declared, cache="true"))
    assert result.ok and result.plan is not None and result.plan.precompute is not None
    fills = [s for s in result.plan.precompute.steps if isinstance(s, P.FillCache)]
    assert [(f.text, f.rows, f.bytes) for f in fills] == [
        ("teacher(train.x)", None, None),  # a factory's size is known at run time
        ("teacher(train.x + 1.0)", None, None),  # a second call of the same teacher: its own fill
    ]
    assert "my_project" not in sys.modules  # the compiler never imports user code


def test_a_teacher_shared_by_two_students_is_filled_once():
    text = """pipeline p {
    steps = 40
    micro_batch = 8
    data train = builtin.synthetic_classification(samples=64, features=4, classes=2)
    model a = builtin.mlp(inputs=4, outputs=2) { zero = { stage = 2 }  optimizer = adamw(lr=1e-3) }
    model b = builtin.mlp(inputs=4, outputs=2, hidden=[8]) { zero = { stage = 2 }  optimizer = adamw(lr=1e-3) }
    model teacher = builtin.mlp(inputs=4, outputs=2) { zero = { stage = 3 }  frozen  cache = true }
    loss la = kl(a(train.x), teacher(train.x))
    loss lb = kl(b(train.x), teacher(train.x), temperature=2.0)
    train a on la
    train b on lb
}
"""
    result = _compile(text)
    assert result.plan is not None and result.plan.precompute is not None
    kinds = [(s.kind, getattr(s, "text", s.model)) for s in result.plan.precompute.steps]
    assert kinds == [("fill_cache", "teacher(train.x)"), ("release_model", "teacher")]
    reads = [op for op in result.plan.step if isinstance(op, P.ReadCache)]
    assert [r.entry for r in reads] == ["teacher#1"]  # one read serves both losses


@pytest.fixture
def lm_pipelines(tmp_path) -> Path:
    """pipelines/ without tiny/, and a teacher directory holding a config and stand-in weights."""
    pipelines = tmp_path / "pipelines"
    shutil.copytree(ROOT / "pipelines", pipelines, ignore=shutil.ignore_patterns("tiny"))
    teacher = pipelines / "tiny" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "model.safetensors").write_bytes(b"weights v1")
    (teacher / "config.json").write_text('{"vocab_size": 259, "architectures": ["GPT2LMHeadModel"]}')
    return pipelines


def test_topk_caches_the_teacher_log_probabilities_at_the_loss_temperature(lm_pipelines):
    text, before = (lm_pipelines / "distill_lm.dsg").read_text(), "temperature=2.0, mask=train.attention_mask)"
    assert before in text
    path = lm_pipelines / "topk.dsg"
    path.write_text(text.replace(before, "temperature=2.0, mask=train.attention_mask, topk=16)"))
    result = compile_file(path, 2, ("teacher.cache=true",))
    assert result.plan is not None and result.plan.precompute is not None, [d.message for d in result.diagnostics]
    (entry,) = result.plan.precompute.entries
    assert (entry.id, entry.path, entry.topk, entry.temperature) == ("teacher#1.logits@top16/T2", ("logits",), 16, 2.0)
    fills = [s for s in result.plan.precompute.steps if isinstance(s, P.FillCache)]
    # rows from the Arrow files of the save_to_disk splits; 16 positions x 16 x (float32 + int32)
    per_row = 16 * 16 * 8
    assert [(f.data, f.rows, f.bytes) for f in fills] == [("train", 448, 448 * per_row), ("test", 64, 64 * per_row)]
    full = compile_file(lm_pipelines / "distill_lm.dsg", 2, ("teacher.cache=true",)).plan
    assert full is not None and full.precompute is not None  # 16 positions x 259 fp32 logits, whole
    assert full.precompute.steps[0].bytes == 448 * 16 * 259 * 4  # type: ignore[union-attr]


def test_a_cache_value_that_is_not_a_mode_is_refused_at_its_value():
    result = _compile(
        _PIPE.format(data="builtin.synthetic_classification(samples=64, features=4, classes=2)", cache="7")
    )
    assert [(d.code, d.span.line) for d in result.diagnostics] == [("DSG203", 6)]


# -- the top-k KL ------------------------------------------------------------------------------


def test_topk_kl_equals_the_full_kl_when_k_is_the_vocabulary_and_keeps_finite_gradients_below_it():
    from dsgraph.runtime.builtins import kl, topk_of

    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, requires_grad=True)
    teacher, mask = torch.randn(3, 5, 11), (torch.rand(3, 5) > 0.3).long()
    for temperature in (1.0, 2.0):
        full = kl(student, teacher, temperature, mask)
        cached = kl(student, topk_of(teacher, 11, temperature), temperature, mask, topk=11)
        live = kl(student, teacher, temperature, mask, topk=11)
        assert abs(full.item() - cached.item()) < 1e-6 and cached.item() == live.item()
        (g_full,) = torch.autograd.grad(full, student)
        (g_top,) = torch.autograd.grad(cached, student)
        assert torch.allclose(g_full, g_top, atol=1e-6)
        truncated = kl(student, teacher, temperature, mask, topk=3)
        (g,) = torch.autograd.grad(truncated, student)
        assert torch.isfinite(g).all() and truncated.item() >= 0


def test_topk_kl_with_the_rest_as_one_class_is_the_kl_of_the_collapsed_distributions():
    """Top-2 of 4 classes: p = (0.5, 0.3 | 0.2 rest), q the student's; the KL of the three-class
    distributions, by hand."""
    from dsgraph.runtime.builtins import TopK, kl

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    top = TopK(p[:, :2].log(), torch.tensor([[0, 1]]))
    expected = 0.5 * torch.log(torch.tensor(0.5 / 0.25)) + 0.3 * torch.log(torch.tensor(0.3 / 0.25))
    expected += 0.2 * torch.log(torch.tensor(0.2 / 0.5))
    assert kl(q.log(), top, topk=2).item() == pytest.approx(expected.item(), abs=1e-6)


# -- the cache folder ----------------------------------------------------------------------------


def _fill(tmp_path: Path, entries=None):
    from dsgraph.runtime import cache

    plan = _plan("pipelines/distill.dsg", "teacher.cache=true")
    assert plan.precompute is not None
    step = plan.precompute.steps[0]
    assert isinstance(step, P.FillCache)
    entries = entries or [plan.precompute.entry(e) for e in step.entries]
    return cache.Fill(tmp_path, "d1", step, entries, "run1"), plan, step


def test_a_fill_is_complete_only_once_committed_and_reads_rows_by_sample_index(tmp_path):
    fill, _, _ = _fill(tmp_path)
    rows = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    fill.create(5, {"teacher#1": rows[:2]})
    fill.write([3, 1], {"teacher#1": rows[[3, 1]]})
    fill.write([0, 2, 4], {"teacher#1": rows[[0, 2, 4]]})
    fill.flush()
    assert not fill.complete(5)  # killed here: a partial folder, never taken for a cache
    fill.commit(5, 0.1)
    assert fill.complete(5) and not (tmp_path / "d1.partial-run1").exists()
    assert not fill.complete(6)  # another data set size: computed again
    read = fill.arrays["teacher#1"].rows(torch.tensor([4, 0, 4]).numpy(), torch.device("cpu"))
    assert torch.equal(read, rows[[4, 0, 4]])
    assert json.loads((tmp_path / "d1" / "manifest.json").read_text())["rows"] == 5


def test_a_changed_teacher_or_data_changes_the_cache_digest(lm_pipelines):
    """The digest covers the teacher's files (a Hugging Face directory's weights) and the data's."""
    from dsgraph.runtime import cache

    result = compile_file(lm_pipelines / "distill_lm.dsg", 2, ("teacher.cache=true",))
    plan = result.plan
    assert plan is not None and plan.precompute is not None, [d.message for d in result.diagnostics]
    step = plan.precompute.steps[0]
    assert isinstance(step, P.FillCache)
    before = cache.fill_digest(plan, step, 1, lm_pipelines)
    assert cache.fill_digest(plan, step, 1, lm_pipelines) == before
    weights = lm_pipelines / "tiny" / "teacher" / "model.safetensors"
    weights.write_bytes(b"weights v2")
    assert cache.fill_digest(plan, step, 1, lm_pipelines) != before
    weights.write_bytes(b"weights v1")
    assert cache.fill_digest(plan, step, 2, lm_pipelines) != before  # another seed: other built-in weights
    arrow = next((lm_pipelines / "data" / "sums_hf" / "train").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes() + b"\0")
    assert cache.fill_digest(plan, step, 1, lm_pipelines) != before
