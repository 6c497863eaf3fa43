"""On-policy post-training on real 2-process DeepSpeed runs (CPU, no mocks): GRPO with a reward
function (pipelines/grpo.dsg, two optimizer steps per batch of rollouts), on-policy distillation
(onpolicy_distill.dsg), and generation itself held to an unsharded copy of the model, greedy and
sampled, under ZeRO-2 and ZeRO-3 (gathered once and layer by layer), with a reward factory and a
ZeRO-3 reward model scoring it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_lm import copy_with_tiny_models
from test_runtime import all_rows, assert_ranks_executed_the_plan, dsgraph_run, metrics, ranks

ROOT = Path(__file__).resolve().parent.parent
STEPS = 24
# Two optimizer steps on each batch of rollouts (GRPO's mu): new rollouts at steps 1, 3, 5, ...
GRPO_SETS = (f"steps={STEPS}", f"checkpoint_every={STEPS // 2}", "rollouts.iterations=2")
pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> Path:
    return copy_with_tiny_models(tmp_path_factory)


@pytest.fixture(scope="module")
def grpo_run(pipelines, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    done = dsgraph_run(pipelines / "grpo.dsg", run_dir, *GRPO_SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _stat(row: dict, name: str) -> float:
    value: float = row["stats"][f"objective/grpo.{name}"]
    return value


def test_grpo_raises_the_reward_on_the_toy_task(grpo_run):
    """The untrained policy rarely writes a digit (mean reward ~0.02); within 24 steps GRPO has
    it writing numbers (the mean reward of the last 4 steps at least 0.1 above the first 4's).
    Each batch of rollouts serves two steps: the same rewards twice, new ones at odd steps."""
    assert_ranks_executed_the_plan(grpo_run)
    rows = metrics(grpo_run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(_stat(r, "reward_mean") for r in rows[:4]) / 4
    last = sum(_stat(r, "reward_mean") for r in rows[-4:]) / 4
    assert last > first + 0.1 and last > 3 * first, (first, last)
    for row in rows:  # every logged step says where its time went
        assert set(row["phase_s"]) == {"generate", "score", "train"}
        assert row["phase_s"]["score"] > 0 and row["phase_s"]["train"] > 0
        assert (row["phase_s"]["generate"] > 0) == (row["step"] % 2 == 1)  # kept rollouts cost nothing
        assert 1 <= _stat(row, "completion_length") <= 4 and 0 <= _stat(row, "clip_fraction") <= 1
    for odd, even in zip(rows[::2], rows[1::2], strict=True):
        assert _stat(even, "reward_mean") == _stat(odd, "reward_mean")
    assert len({_stat(r, "reward_mean") for r in rows[::2]}) > 1
    for report in ranks(grpo_run):  # 8 prompts x 8 samples per rank, every other step
        assert report["generated"]["rollouts"]["calls"] == STEPS // 2
        assert report["generated"]["rollouts"]["completions"] == STEPS // 2 * 64


def test_grpo_starts_on_policy_with_the_kl_at_zero(grpo_run):
    """Step 1: the policy is its reference (KL exactly 0 with beta = 0.04), the ratio to the
    log-probabilities recorded while sampling is 1 (nothing clipped), so the loss is minus the
    mean advantage, which group normalisation makes 0. Step 2 trains on the same rollouts with
    the policy moved: the ratio leaves 1 and the clipping takes hold."""
    first, second = metrics(grpo_run)[:2]
    assert _stat(first, "kl") == 0.0
    assert _stat(first, "clip_fraction") == 0.0
    assert abs(first["losses"]["objective"]) < 1e-6
    assert _stat(second, "kl") > 0 and _stat(second, "clip_fraction") > 0


def _values(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["losses"], r["terms"], r["stats"]) for r in all_rows(run_dir)]


def test_a_grpo_run_killed_midway_and_resumed_is_bit_identical(grpo_run, pipelines, tmp_path):
    """The run as if it had died after its middle checkpoint: the resumed run samples the same
    completions (each rank's sampling generator is in the checkpoint) and logs exactly the same
    losses, rewards and KL, step for step; the trained policy's weights are equal."""
    cut = tmp_path / "cut"
    shutil.copytree(grpo_run, cut)
    (cut / "ckpt" / "manifests" / f"step-{STEPS:08d}.json").unlink()  # the last checkpoint never completed
    shutil.rmtree(cut / "models")
    command = [sys.executable, "-m", "dsgraph", "run", str(pipelines / "grpo.dsg"), "--procs", "2"]
    sets = ["log_every=1", *GRPO_SETS]
    command += ["--resume", str(cut), *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step-{STEPS // 2:08d}" in done.stderr
    assert _values(cut) == _values(grpo_run)
    from safetensors.torch import load_file

    a, b = (load_file(run / "models" / "policy" / "model.safetensors") for run in (grpo_run, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_onpolicy_distillation_lowers_the_divergence_on_the_students_own_samples(pipelines, tmp_path):
    """The `distill/gkd` term is the teacher-student JSD over the completions the student has
    just sampled; it falls as the student trains."""
    run_dir = tmp_path / "run"
    done = dsgraph_run(pipelines / "onpolicy_distill.dsg", run_dir, "steps=20")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_ranks_executed_the_plan(run_dir)
    on_policy = [r["terms"]["distill/gkd"] for r in metrics(run_dir)]
    first, last = sum(on_policy[:3]) / 3, sum(on_policy[-3:]) / 3
    assert last < 0.8 * first, (first, last)


# -- generation held to an unsharded copy ------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_run(pipelines, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """tests/fixtures/greedy.dsg, one step: the run directory, and each rank's generations and
    rewards as the loss recorded them."""
    here = tmp_path_factory.mktemp("greedy")
    for name in ("greedy.dsg", "factories.py"):
        shutil.copy(ROOT / "tests" / "fixtures" / name, pipelines / name)
    out = here / "recorded"
    import os

    command = [sys.executable, "-m", "dsgraph", "run", str(pipelines / "greedy.dsg"), "--procs", "2"]
    command += ["--run-dir", str(here / "run"), "--set", "log_every=1"]
    env = dict(os.environ, DSGRAPH_TEST_RECORD=str(out))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return here / "run", {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _replica(model, prompts: torch.Tensor, samples: int, new: int, generator: torch.Generator | None) -> list:
    """Generation by full forwards (no key/value cache) on the whole model, in one process:
    greedy without a generator, else sampled at temperature 1 from the generator."""
    ids = prompts.repeat_interleave(samples, dim=0)
    mask = (ids != 256).long()
    done = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(new):
            logits = model(ids, attention_mask=mask).logits[:, -1].float()
            if generator is None:
                token = logits.argmax(-1)
            else:
                token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)
            token = torch.where(done, torch.full_like(token, 256), token)
            mask = torch.cat([mask, (~done).long().unsqueeze(1)], dim=1)
            ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
            done = done | (token == 258)
    return ids.tolist()


def test_generation_under_zero2_and_zero3_gives_the_tokens_of_an_unsharded_copy(pipelines, greedy_run):
    """Greedy: the ZeRO-2 copy, the ZeRO-3 copy gathered once and gathered layer by layer all give
    exactly the unsharded model's tokens. Sampled: with each generation's own seeded generator on
    each rank, the same draws as the unsharded model's from a generator seeded alike."""
    from transformers import AutoModelForCausalLM

    from dsgraph.runtime.executor import model_seed

    run_dir, recorded = greedy_run
    assert_ranks_executed_the_plan(run_dir)
    for report in ranks(run_dir):  # how each generation held its weights
        gathered = {name: g["gathered"] for name, g in report["generated"].items()}
        assert gathered == {
            "g2": "unpartitioned",
            "g3": "once",
            "g3_layers": "layers",
            "s2": "unpartitioned",
            "s3": "layers",
        }
    model = AutoModelForCausalLM.from_pretrained(pipelines / "tiny" / "policy").eval()
    for rank, rows in recorded.items():
        prompts = torch.tensor(rows["g0"])[:, :8]
        greedy = _replica(model, prompts, 1, 8, None)
        assert rows["g0"] == rows["g1"] == rows["g2"] == greedy, rank
        for index, name in ((3, "s2"), (4, "s3")):
            generator = torch.Generator().manual_seed(model_seed(0 * 7919 + rank, f"generate/{name}"))
            assert rows[f"g{index}"] == _replica(model, prompts, 2, 8, generator), (rank, name)
        assert rows["g3"] != rows["g4"]  # two generators, two draws


def test_a_reward_factory_and_a_zero3_reward_model_score_the_completions(pipelines, greedy_run):
    """The rewards of the sampled ZeRO-2 generation: the reward factory got each completion's
    text (special tokens dropped) after its prompt's and its options (2 per character + the
    prompt's length / 100), plus the ZeRO-3 reward model's score, which equals the unsharded
    reward model's on the same tokens; the reward model is partitioned across the ranks."""
    from transformers import AutoModelForSequenceClassification

    run_dir, recorded = greedy_run
    scorer = AutoModelForSequenceClassification.from_pretrained(pipelines / "tiny" / "reward").eval()
    for rank, rows in recorded.items():
        ids = torch.tensor(rows["g3"])
        with torch.no_grad():
            scores = scorer(ids, attention_mask=(ids != 256).long()).logits[:, 0].tolist()
        expected = []
        for row, mask, score in zip(rows["g3"], rows["g3_completion_mask"], scores, strict=True):
            prompt = bytes(t for t in row[:8] if t < 256).decode()
            completion = bytes(t for t, m in zip(row, mask, strict=True) if m and t < 256).decode(errors="replace")
            expected.append(2.0 * len(completion) + len(prompt) / 100 + score)
        assert [r[0] for r in rows["rewards"]] == pytest.approx(expected, abs=1e-5), rank
    for report in ranks(run_dir):
        local, total = report["shards"]["scorer"]
        assert 0 < local < total
