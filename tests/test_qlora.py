"""QLoRA: 4-bit base weights (bitsandbytes) under a LoRA adapter, on ZeRO-3 and ZeRO-2.

The runs (marked `runtime`) are real 2-process DeepSpeed runs on CPU of a QLoRA distillation: a
4-bit nf4 student trained through its adapter, beside a frozen 4-bit fp4 teacher, both ZeRO-3, on
tiny GPT-2 models written by pipelines/make_tiny_models.py; held to a single-process replica that
quantizes the same way, to the memory estimate, and to the original base weights. The compile
tests (no process started) hold the language, the plan and the estimate's counting rule."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsgraph import cli
from dsgraph.compiler import compile_file
from dsgraph.dsconfig import estimate as memory
from dsgraph.plan import Plan, Quantize
from dsgraph.render import to_text
from dsgraph.runtime.meta import count_plan
from replica import build_model, evaluate_whole, load_plan, replicate
from test_lm import copy_with_tiny_models
from test_memory import assert_estimate_holds
from test_runtime import all_rows, assert_ranks_executed_the_plan, dsgraph_run, metrics, ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
runtime = pytest.mark.runtime

# lora_distill.dsg with both models in 4 bits: the student trains its adapter, the teacher is frozen
# (and evaluated in eval mode under no_grad, where bitsandbytes' CPU repacking would strike).
QLORA = """\
pipeline qlora {
    seed = 0
    steps = 100
    micro_batch = 16
    log_every = 10

    data train = builtin.hf_dataset(path="data/sums_hf", split="train", tokenizer="bytes", max_length=16) {
        eval = test
    }
    data test = builtin.hf_dataset(path="data/sums_hf", split="test", tokenizer="bytes", max_length=16)

    model teacher = hf("tiny/teacher") {
        zero = { stage = 3  stage3_param_persistence_threshold = 0 }
        quantize = bnb4(type="fp4", double_quant=false)
        frozen
    }

    model student = hf("tiny/policy") {
        zero = { stage = 3  stage3_param_persistence_threshold = 0 }
        quantize = bnb4()
        lora = lora(r=8, alpha=16, dropout=0.05, targets=["c_attn", "c_proj", "c_fc"])
        optimizer = adamw(lr=5e-3, weight_decay=0.0)
        clip = 1.0
    }

    loss kd = 0.5 * kl(student(train.input_ids, attention_mask=train.attention_mask).logits,
                       teacher(train.input_ids, attention_mask=train.attention_mask).logits,
                       temperature=2.0, mask=train.attention_mask)
            + 0.5 * ce(student(train.input_ids, attention_mask=train.attention_mask).logits,
                       train.labels, shift=true)

    train student on kd
}
"""

# The tiny models' shapes (pipelines/make_tiny_models.py), for the counts by hand.
SIZES = {"teacher": (64, 2), "policy": (32, 2)}  # n_embd, n_layer
VOCAB, POSITIONS = 259, 32


# -- the compile side ----------------------------------------------------------------------------


@pytest.fixture
def configs_only(tmp_path) -> Path:
    """A directory with qlora.dsg and the tiny models' config.json (no weights): enough to
    compile, plan and count on the meta device."""
    transformers = pytest.importorskip("transformers")
    for name, (embd, layers) in SIZES.items():
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=POSITIONS, n_embd=embd, n_layer=layers, n_head=2, tie_word_embeddings=True
        )
        config.save_pretrained(tmp_path / "tiny" / name)
    (tmp_path / "qlora.dsg").write_text(QLORA)
    return tmp_path


def test_quantize_is_in_the_plan_and_a_quantized_zero3_model_is_built_whole(configs_only):
    result = compile_file(configs_only / "qlora.dsg", world_size=2)
    assert result.ok, [d.message for d in result.diagnostics]
    plan = result.plan
    student, teacher = plan.model("student"), plan.model("teacher")
    assert student.quantize == Quantize("nf4", True) and teacher.quantize == Quantize("fp4", False)
    for m in (student, teacher):  # 4-bit weights load outside zero.Init: partitioned by the engine
        assert m.stage == 3 and m.built_whole and not m.zero_init
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["models"][1]["quantize"] == {"type": "nf4", "double_quant": True}
    text = to_text(plan)
    assert "student  4-bit nf4 (bitsandbytes, double quant)  whole (4-bit weights load outside zero.Init" in text
    assert "teacher  4-bit fp4 (bitsandbytes)  whole" in text
    assert 'quantize=bnb4{"double_quant": true, "type": "nf4"}' in result.ir.show()
    two = compile_file(configs_only / "qlora.dsg", world_size=2, overrides=("student.zero={ stage = 2 }",))
    assert two.ok and two.plan is not None
    assert not two.plan.model("student").built_whole and two.plan.model("student").quantize is not None


def _quantized_gpt2(embd: int, layers: int) -> list[int]:
    """GPT-2's weights that Transformers loads in 4 bits: every Conv1D (c_attn, attn c_proj, c_fc,
    mlp c_proj); not the embeddings, the norms, the biases or the tied output head."""
    return [embd * 3 * embd, embd * embd, embd * 4 * embd, 4 * embd * embd] * layers


def test_the_estimate_counts_4bit_weights_at_half_a_byte_and_their_constants_whole(configs_only):
    result = compile_file(configs_only / "qlora.dsg", world_size=2)
    assert result.ok
    counts = count_plan(result.plan)
    est = {m.name: m for m in memory.estimate(result.plan, counts, 2).models}
    for name, model, double_quant in (("teacher", "teacher", False), ("student", "policy", True)):
        embd, layers = SIZES[model]
        quantized = _quantized_gpt2(embd, layers)
        assert sorted(counts[name].quantized) == sorted(quantized)
        plain = list(counts[name].sizes)  # the unquantized weights and the adapter's
        for n in quantized:
            plain.remove(n)
        assert (
            sum(plain) - (sum(counts[name].trainable) if result.plan.model(name).lora else 0)
            == VOCAB * embd + POSITIONS * embd + layers * (4 * embd + 3 * embd + embd + 4 * embd + embd) + 2 * embd
        )
        # ZeRO-3, fp32: every tensor split over 2 ranks; a 4-bit weight is n/2 bytes, packed into
        # fp32 elements (n/8 of them); its quantization constants whole on each rank.
        constants = sum(
            (math.ceil(n / 64) + 4 * math.ceil(n / 16384) + 1024 + 64 + 4)
            if double_quant
            else 4 * math.ceil(n / 64) + 64
            for n in quantized
        )
        assert counts[name].quant_state == constants
        packed = sum(math.ceil(n / 8 / 2) * 4 for n in quantized)
        assert est[name].params == sum(math.ceil(n / 2) * 4 for n in plain) + packed + constants
    # Only the adapter is trained: r=8 A and B on each adapted Conv1D.
    embd, layers = SIZES["policy"]
    adapter = layers * sum(8 * (i + o) for i, o in ((embd, 3 * embd), (embd, embd), (embd, 4 * embd), (4 * embd, embd)))
    assert est["student"].trainable == adapter and est["student"].grads == 4 * adapter // 2
    assert est["student"].optimizer_states == 4 * 3 * adapter // 2  # fp32 master + exp_avg + exp_avg_sq


def _diagnostics(tmp_path: Path, block: str, source: str) -> set[tuple[str, int, int]]:
    """qlora.dsg with the student's source and properties replaced: its `quantize` on line 20."""
    text = QLORA.replace(
        """    model student = hf("tiny/policy") {
        zero = { stage = 3  stage3_param_persistence_threshold = 0 }
        quantize = bnb4()
        lora = lora(r=8, alpha=16, dropout=0.05, targets=["c_attn", "c_proj", "c_fc"])
""",
        f"    model student = {source} {{\n        zero = {{ stage = 3 }}\n{block}",
    )
    (tmp_path / "case.dsg").write_text(text)
    result = compile_file(tmp_path / "case.dsg")
    return {(d.code, d.span.line, d.span.col) for d in result.diagnostics}


@pytest.mark.parametrize(
    ("block", "source", "expected"),
    [
        ('        quantize = bnb4(type="int4")\n        lora = lora()\n', None, {("DSG209", 20, 30)}),
        ("        quantize = bnb4(type=nf4, double_quant=false)\n        lora = lora()\n", None, set()),
        ("        quantize = bnb4(bits=4)\n        lora = lora()\n", None, {("DSG204", 20, 25)}),
        ("        quantize = gptq()\n        lora = lora()\n", None, {("DSG206", 20, 20)}),
        ("        quantize = nf4\n        lora = lora()\n", None, {("DSG203", 20, 20)}),
        ("        quantize = bnb4()\n", None, {("DSG421", 20, 9)}),
        ("        quantize = bnb4()\n        lora = lora(merge=true)\n", None, {("DSG209", 21, 21)}),
        (
            "        quantize = bnb4()\n        lora = lora()\n",
            'hf(config="tiny/policy/config.json")',
            {("DSG209", 20, 9)},
        ),
        (
            '        quantize = bnb4()\n        lora = lora(targets=["0"])\n',
            "builtin.mlp(inputs=4, outputs=2)",
            {("DSG209", 20, 9)},
        ),
    ],
    ids=["type", "ok", "unknown-argument", "unknown-quantizer", "not-a-call", "no-lora", "merge", "config", "builtin"],
)
def test_quantize_diagnostics(configs_only, block, source, expected):
    assert _diagnostics(configs_only, block, source or 'hf("tiny/policy")') == expected


def test_a_frozen_4bit_model_needs_no_adapter(configs_only):
    result = compile_file(configs_only / "qlora.dsg", world_size=2)
    assert result.ok and result.plan.model("teacher").lora is None


def test_run_without_bitsandbytes_stops_before_launching(configs_only, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    run_dir = configs_only / "run"
    status = cli.main(["run", str(configs_only / "qlora.dsg"), "--procs", "2", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert status == 1
    (line,) = [e for e in err.splitlines() if "bitsandbytes" in e]
    assert "qlora.dsg:14:9: error: `quantize` (`teacher`, `student`) needs the package bitsandbytes" in line
    assert line.endswith(": pip install bitsandbytes")
    assert not run_dir.exists()


# -- real runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Path:
    """A copy of pipelines/ with tiny/{teacher,student,policy} written beside it, and qlora.dsg."""
    here = copy_with_tiny_models(tmp_path_factory)
    (here / "qlora.dsg").write_text(QLORA)
    return here


@pytest.fixture(scope="module")
def qlora_runs(pipelines, tmp_path_factory) -> dict[int, Path]:
    """The QLoRA student on ZeRO-3 (built whole, partitioned by its engine) and on ZeRO-2."""
    out = {}
    for stage in (3, 2):
        run_dir = tmp_path_factory.mktemp(f"qlora{stage}") / "run"
        sets = (f"checkpoint_every={STEPS // 2}",) if stage == 3 else ("student.zero={ stage = 2 }",)
        done = dsgraph_run(pipelines / "qlora.dsg", run_dir, f"steps={STEPS}", *sets)
        assert done.returncode == 0, done.stderr[-3000:]
        out[stage] = run_dir
    return out


@runtime
@pytest.mark.parametrize("stage", [3, 2])
def test_qlora_matches_its_replica_and_its_memory_estimate(qlora_runs, stage):
    run_dir = qlora_runs[stage]
    assert_ranks_executed_the_plan(run_dir)
    plan = load_plan(run_dir)
    assert plan.model("student").built_whole is (stage == 3)
    expected = replicate(plan, world=2)  # 4-bit weights by the same helpers, in one process
    actual = [m["losses"] for m in metrics(run_dir)]
    assert len(actual) == len(expected) == STEPS
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        assert abs(a["kd"] - e["kd"]) < 1e-5, (step, a["kd"], e["kd"])
    assert actual[-1]["kd"] < actual[0]["kd"]
    # Packed weights at n/2 bytes (split at ZeRO-3), their constants whole on every rank, and
    # gradients and Adam state for the adapter alone: estimated as measured.
    assert_estimate_holds(run_dir)
    local, total = ranks(run_dir)[0]["shards"]["student"]
    assert (0 < local < total) if stage == 3 else local == total


@runtime
def test_only_the_adapter_trains_the_4bit_base_is_unchanged(pipelines, qlora_runs):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from dsgraph.runtime import adapters
    from dsgraph.runtime.executor import state_digest

    for stage, run_dir in qlora_runs.items():
        plan = load_plan(run_dir)
        exported = run_dir / "models" / "student" / "adapter"
        adapter = load_file(str(exported / "adapter_model.safetensors"))
        assert adapter and all("lora_" in key for key in adapter), sorted(adapter)[:3]
        assert any(key.endswith("lora_B.weight") and t.abs().sum() > 0 for key, t in adapter.items())
        # The run's last evaluation is reproduced by the exported adapter on the original 4-bit
        # base, loaded afresh: the base the run ended with is the one it began with.
        teacher = build_model(plan, plan.model("teacher"))
        base = build_model(plan, dataclasses.replace(plan.model("student"), lora=None))
        student = PeftModel.from_pretrained(base, exported)
        adapters.keep_4bit_layout(student)
        expected = evaluate_whole(plan, {"student": student, "teacher": teacher})
        (row,) = [r for r in all_rows(run_dir) if r["split"] == "eval"]
        assert row["step"] == STEPS and row["samples"] == 64
        for stat in ("kd/ce.token_accuracy", "kd/ce.perplexity"):  # exact over the eval set's tokens
            assert row["stats"][stat] == pytest.approx(expected[stat], rel=1e-6), (stage, stat)
        with student.disable_adapter():  # and the adapter is what changed it
            untrained = evaluate_whole(plan, {"student": student, "teacher": teacher})
        assert abs(untrained["kd/ce.perplexity"] - expected["kd/ce.perplexity"]) > 1e-3
        # The frozen 4-bit teacher, gathered from its ZeRO-3 shards at the end, is bit-identical to
        # the model loaded afresh: its packed weights and their constants.
        with torch.no_grad():
            fresh = state_digest(build_model(plan, plan.model("teacher")).state_dict())
        assert ranks(run_dir)[0]["frozen_digests"]["teacher"] == fresh


@runtime
def test_a_qlora_run_resumes_bit_identically_from_its_checkpoint(pipelines, qlora_runs, tmp_path):
    """The ZeRO-3 run, as if it had died after its middle checkpoint: the adapter, its Adam state,
    data and RNG are restored (the 4-bit weights' quantization constants, saved beside them, are
    the base's own) and the resumed steps give exactly the uninterrupted run's losses."""
    full = qlora_runs[3]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "ckpt" / "manifests" / f"step-{STEPS:08d}.json").unlink()  # the last checkpoint never completed
    sets = [f"checkpoint_every={STEPS // 2}", f"steps={STEPS}", "log_every=1"]
    command = [sys.executable, "-m", "dsgraph", "run", str(pipelines / "qlora.dsg"), "--procs", "2"]
    command += ["--resume", str(cut), *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step-{STEPS // 2:08d}" in done.stderr
    assert [m["losses"] for m in metrics(cut)] == [m["losses"] for m in metrics(full)]
