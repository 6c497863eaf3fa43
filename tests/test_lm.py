"""Language-model post-training on real 2-process DeepSpeed runs (CPU, no mocks): the shipped
distill_lm, dpo and lora_distill pipelines on tiny GPT-2 models that the test writes with
`from_config` + `save_pretrained` (pipelines/make_tiny_models.py), loaded back from disk."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from replica import evaluate_whole, load_plan, replicate
from test_memory import assert_estimate_holds
from test_runtime import all_rows, assert_ranks_executed_the_plan, dsgraph_run, metrics, ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Path:
    return copy_with_tiny_models(tmp_path_factory)


def copy_with_tiny_models(tmp_path_factory) -> Path:
    """A copy of pipelines/ with tiny/{teacher,student,policy} written beside it."""
    here = tmp_path_factory.mktemp("pipelines")
    for item in (ROOT / "pipelines").iterdir():
        if item.name != "tiny":
            (shutil.copytree if item.is_dir() else shutil.copy)(item, here / item.name)
    sys.path.insert(0, str(here))
    try:
        import make_tiny_models

        make_tiny_models.main([str(here / "tiny")])
    finally:
        sys.path.remove(str(here))
    return here


def _assert_matches_replica(run_dir: Path, tolerance: float = 1e-5) -> list[dict]:
    assert_ranks_executed_the_plan(run_dir)
    plan = load_plan(run_dir)
    expected = replicate(plan, world=2)
    actual = [m["losses"] for m in metrics(run_dir)]
    assert len(actual) == len(expected) == plan.settings.steps
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), 1):
        for loss in a:
            assert abs(a[loss] - e[loss]) < tolerance, (step, loss, a[loss], e[loss])
    return actual


@pytest.fixture(scope="module")
def distill_lm_run(pipelines, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("distill_lm") / "run"
    done = dsgraph_run(pipelines / "distill_lm.dsg", run_dir, f"steps={STEPS}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_distill_lm_trains_a_student_from_a_zero3_teacher(distill_lm_run):
    run_dir = distill_lm_run
    losses = _assert_matches_replica(run_dir)
    assert losses[-1]["kd"] < losses[0]["kd"]
    assert_estimate_holds(run_dir)  # `dsgraph compile --memory` vs what each rank held
    local, total = ranks(run_dir)[0]["shards"]["teacher"]
    assert 0 < local < total  # partitioned as it loaded
    assert (run_dir / "models" / "student" / "config.json").is_file()
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "student")
    assert student.config.n_layer == 1  # the student, saved with save_pretrained


def test_distill_lm_evaluates_token_accuracy_and_perplexity_over_the_whole_test_split(pipelines, distill_lm_run):
    """The held-out split (64 sums, a `datasets` save_to_disk directory) in micro batches of 16 on
    2 ranks; token accuracy and perplexity are exact over its answer tokens."""
    from transformers import AutoModelForCausalLM

    run_dir = distill_lm_run
    plan = load_plan(run_dir)
    models = {
        "student": AutoModelForCausalLM.from_pretrained(run_dir / "models" / "student"),
        "teacher": AutoModelForCausalLM.from_pretrained(pipelines / "tiny" / "teacher"),
    }
    expected = evaluate_whole(plan, models)
    rows = [r for r in all_rows(run_dir) if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [STEPS] and rows[0]["samples"] == 64
    for stat in ("kd/ce.token_accuracy", "kd/ce.perplexity"):
        assert rows[0]["stats"][stat] == pytest.approx(expected[stat], rel=1e-6), stat
    assert 1.0 < rows[0]["stats"]["kd/ce.perplexity"] < 259  # below the byte vocabulary's uniform guess


def test_gradient_checkpointing_gives_the_same_losses(pipelines, distill_lm_run, tmp_path):
    run_dir = tmp_path / "run"
    done = dsgraph_run(pipelines / "distill_lm.dsg", run_dir, f"steps={STEPS}", "student.gradient_checkpointing=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_plan(run_dir).model("student").gradient_checkpointing
    for a, b in zip(metrics(run_dir), metrics(distill_lm_run), strict=True):
        for name in a["losses"]:
            assert a["losses"][name] == pytest.approx(b["losses"][name], abs=1e-6), (a["step"], name)


@pytest.mark.parametrize("topk", [None, 259])
def test_a_cached_lm_teacher_gives_the_live_losses_whole_or_as_top_k_of_the_whole_vocabulary(
    pipelines, distill_lm_run, tmp_path, topk
):
    """The GPT-2 teacher's logits computed once before the loop (448 training and 64 test samples),
    whole, or as the top-k log-probabilities with k the byte vocabulary (259): every training step
    and the evaluation give the live run's losses and statistics within 1e-6."""
    pipeline = pipelines / "distill_lm.dsg"
    if topk:
        text, kd = pipeline.read_text(), "temperature=2.0, mask=train.attention_mask)"
        assert kd in text
        pipeline = pipelines / "distill_lm_topk.dsg"
        pipeline.write_text(text.replace(kd, f"temperature=2.0, mask=train.attention_mask, topk={topk})"))
    run_dir = tmp_path / "run"
    done = dsgraph_run(pipeline, run_dir, f"steps={STEPS}", "teacher.cache=true")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = load_plan(run_dir)
    assert plan.precompute is not None and [e.topk for e in plan.precompute.entries] == [topk]
    cached, live = all_rows(run_dir), all_rows(distill_lm_run)
    assert [r["step"] for r in cached] == [r["step"] for r in live]
    for a, b in zip(cached, live, strict=True):
        for group in ("losses", "terms", "stats"):
            for name, value in b[group].items():
                assert a[group][name] == pytest.approx(value, abs=1e-6), (a["split"], a["step"], name)
    for report in ranks(run_dir):
        assert [(f["rows"], f["forwards"]) for f in report["precompute"]] == [(448, 14), (64, 2)]
        assert report["released"]["teacher"]["engine_freed"]
    assert_ranks_executed_the_plan(run_dir)


def _margins(policy, reference, pairs) -> torch.Tensor:
    """beta-free DPO margins of every pair: (policy - reference) on chosen minus on rejected."""
    from dsgraph.runtime.builtins import sequence_logprobs

    def logps(model, side):
        with torch.no_grad():
            logits = model(pairs[f"{side}_input_ids"], attention_mask=pairs[f"{side}_attention_mask"]).logits
        return sequence_logprobs(logits, pairs[f"{side}_labels"])

    return (logps(policy, "chosen") - logps(reference, "chosen")) - (
        logps(policy, "rejected") - logps(reference, "rejected")
    )


def test_dpo_grows_the_reward_margin_and_starts_at_log_2(pipelines, tmp_path):
    from transformers import AutoModelForCausalLM
    from dsgraph.runtime.builtins import preference_pairs
    from dsgraph.runtime.executor import state_digest

    run_dir = tmp_path / "run"
    done = dsgraph_run(pipelines / "dpo.dsg", run_dir, "steps=30")
    assert done.returncode == 0, done.stderr[-3000:]
    losses = _assert_matches_replica(run_dir)
    assert_estimate_holds(run_dir)
    # Policy and reference start from the same weights: every margin is 0, the loss is log 2.
    assert abs(losses[0]["preference"] - math.log(2)) < 1e-6
    logged = [m["stats"] for m in metrics(run_dir)]
    assert logged[0] == {"preference/dpo.reward_margin": 0.0, "preference/dpo.reward_accuracy": 0.0}
    late = [s["preference/dpo.reward_margin"] for s in logged[-10:]]
    assert sum(late) / len(late) > 0, late  # the batches' margins grew too
    reference = AutoModelForCausalLM.from_pretrained(pipelines / "tiny" / "policy").eval()
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "models" / "policy").eval()
    pairs = preference_pairs(str(pipelines / "data" / "sum_pairs.jsonl"), max_length=16).columns
    before = _margins(reference, reference, pairs).mean()
    after = _margins(policy, reference, pairs).mean()
    assert before == 0 and after > 0.05, (float(before), float(after))
    # The frozen ZeRO-3 reference ends bit-identical to the checkpoint it was loaded from.
    assert ranks(run_dir)[0]["frozen_digests"]["reference"] == state_digest(reference.state_dict())


def test_dpo_loss_matches_a_hand_computed_one():
    """Two pairs, vocabulary 3, written out: log-softmax by hand, the labelled tokens summed."""
    from dsgraph.runtime.builtins import dpo

    torch.manual_seed(0)
    logits = {k: torch.randn(2, 4, 3) for k in ("pc", "pr", "rc", "rr")}
    chosen = torch.tensor([[-100, 2, 1, -100], [-100, -100, 0, 2]])
    rejected = torch.tensor([[-100, 0, -100, -100], [-100, 1, 1, 1]])

    def seq_logp(lg, labels, row):
        total = 0.0
        for t in range(1, labels.shape[1]):  # the logits at t-1 predict the label at t
            if labels[row, t] == -100:
                continue
            scores = [float(x) for x in lg[row, t - 1]]
            total += scores[int(labels[row, t])] - math.log(sum(math.exp(s) for s in scores))
        return total

    beta, expected = 0.3, 0.0
    for row in range(2):
        margin = (seq_logp(logits["pc"], chosen, row) - seq_logp(logits["rc"], chosen, row)) - (
            seq_logp(logits["pr"], rejected, row) - seq_logp(logits["rr"], rejected, row)
        )
        expected += -math.log(1.0 / (1.0 + math.exp(-beta * margin))) / 2
    actual = dpo(logits["pc"], logits["pr"], logits["rc"], logits["rr"], chosen, rejected, beta=beta)
    assert abs(float(actual) - expected) < 1e-6


def test_masked_kl_ignores_padding():
    from dsgraph.runtime.builtins import kl

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = student.clone()
    changed[0, 3:] = 100.0  # padding positions: anything at all
    assert torch.allclose(kl(student, teacher, 2.0, mask), kl(changed, teacher, 2.0, mask))
    kept = mask.reshape(-1).bool()
    by_rows = kl(student.reshape(-1, 7)[kept], teacher.reshape(-1, 7)[kept], 2.0)
    assert torch.allclose(kl(student, teacher, 2.0, mask), by_rows)


@pytest.fixture(scope="module")
def lora_runs(pipelines, tmp_path_factory):
    """lora_distill with its ZeRO-2 student, and again with the student on ZeRO-3."""
    out = {}
    for stage, sets in (
        (2, ()),
        (3, ("student.zero={ stage = 3  stage3_param_persistence_threshold = 0 }", f"checkpoint_every={STEPS // 2}")),
    ):
        run_dir = tmp_path_factory.mktemp(f"lora{stage}") / "run"
        done = dsgraph_run(pipelines / "lora_distill.dsg", run_dir, f"steps={STEPS}", *sets)
        assert done.returncode == 0, done.stderr[-3000:]
        out[stage] = run_dir
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_student_matches_its_replica_and_its_memory_estimate(lora_runs, stage):
    losses = _assert_matches_replica(lora_runs[stage])
    assert losses[-1]["kd"] < losses[0]["kd"]
    assert_estimate_holds(lora_runs[stage])  # only the adapter has gradients and Adam state


def test_lora_trains_only_the_adapter_and_exports_it_and_the_merged_model(pipelines, lora_runs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    for stage, run_dir in lora_runs.items():
        student = run_dir / "models" / "student"
        adapter = load_file(str(student / "adapter" / "adapter_model.safetensors"))
        assert adapter and all("lora_" in key for key in adapter), sorted(adapter)[:3]
        assert any(key.endswith("lora_B.weight") and t.abs().sum() > 0 for key, t in adapter.items())
        # The original base weights + the adapter == the merged export: so the base was not
        # trained, and the merge folded the adapter in correctly.
        base = AutoModelForCausalLM.from_pretrained(pipelines / "tiny" / "policy")
        with_adapter = PeftModel.from_pretrained(base, student / "adapter").eval()
        merged = AutoModelForCausalLM.from_pretrained(student / "merged").eval()
        ids = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(stage))
        with torch.no_grad():
            a, b = with_adapter(ids).logits, merged(ids).logits
            plain = AutoModelForCausalLM.from_pretrained(pipelines / "tiny" / "policy")(ids).logits
        assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
        assert not torch.allclose(a, plain, atol=1e-4)  # the adapter learned something
    # ZeRO-2 and ZeRO-3 train the same adapter (fp32: the same arithmetic).
    two, three = (metrics(lora_runs[s]) for s in (2, 3))
    assert all(abs(x["losses"]["kd"] - y["losses"]["kd"]) < 1e-5 for x, y in zip(two, three, strict=True))
    local, total = ranks(lora_runs[3])[0]["shards"]["student"]
    assert 0 < local < total  # base and adapter partitioned


def test_a_lora_run_resumes_bit_identically_from_its_checkpoint(pipelines, lora_runs, tmp_path):
    """The ZeRO-3 LoRA run, as if it had died after its middle checkpoint: the resumed steps give
    exactly the losses of the uninterrupted run (the adapter, its Adam state, data and RNG restored)."""
    full = lora_runs[3]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "ckpt" / "manifests" / f"step-{STEPS:08d}.json").unlink()  # the last checkpoint never completed
    sets = [
        "student.zero={ stage = 3  stage3_param_persistence_threshold = 0 }",
        f"checkpoint_every={STEPS // 2}",
        f"steps={STEPS}",
        "log_every=1",
    ]
    command = [
        sys.executable,
        "-m",
        "dsgraph",
        "run",
        str(pipelines / "lora_distill.dsg"),
        "--procs",
        "2",
        "--resume",
        str(cut),
        *[a for s in sets for a in ("--set", s)],
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step-00000003" in done.stderr
    assert [m["losses"] for m in metrics(cut)] == [m["losses"] for m in metrics(full)]
