"""Evaluation, in real 2-process runs: the eval figures are exact means over the whole eval set
(an uneven last batch, a rank that runs a padding batch), evaluating changes nothing in training,
and the rows, progress and summary say what was evaluated. Plus how the training data is dealt:
`shuffle = false` and `drop_last = false` give exactly the batches of Accelerate's prepared
DataLoader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler, TensorDataset

from dsgraph.runtime import builtins, data, sources
from dsgraph.runtime.executor import model_seed
from replica import evaluate_whole, load_plan
from test_runtime import ROOT, dsgraph_run

STEPS = 12
EVAL_EVERY = 5


def rows(run_dir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    sets = (f"steps={STEPS}", f"eval_every={EVAL_EVERY}", "track=[tensorboard, mlflow, wandb]", "rank_metrics=true")
    done = dsgraph_run(ROOT / "pipelines" / "distill.dsg", run_dir, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """distill.dsg without its eval set."""
    folder = tmp_path_factory.mktemp("plain")
    shutil.copytree(ROOT / "pipelines" / "configs", folder / "configs")
    text = (ROOT / "pipelines" / "distill.dsg").read_text()
    text = text.replace("{ eval = val }", "").replace("eval_every = 100", "")
    (folder / "plain.dsg").write_text(text)
    run_dir = folder / "run"
    done = dsgraph_run(folder / "plain.dsg", run_dir, f"steps={STEPS}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.mark.runtime
def test_eval_rows_come_every_eval_every_steps_and_at_the_end(evaluated_run):
    run_dir, done = evaluated_run
    evals = rows(run_dir, "eval")
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert all(r["samples"] == 1000 for r in evals)  # every sample once: none dropped, none twice
    assert all(set(r["losses"]) == {"kd"} and set(r["terms"]) == {"kd/kl", "kd/ce"} for r in evals)
    assert all(set(r["stats"]) == {"kd/ce.accuracy"} and r["eval_s"] > 0 for r in evals)
    assert [r["step"] for r in rows(run_dir, "train")] == list(range(1, STEPS + 1))
    summary = done.stdout
    assert re.search(r"evaluation \d+\.\d s", summary)
    assert "eval kd" in summary and "(eval, step 12, 1000 samples)" in summary


@pytest.mark.runtime
def test_eval_mean_equals_a_single_process_mean_over_the_whole_eval_set(evaluated_run):
    """1000 samples in micro batches of 16 over 2 ranks: 62 whole batches and one of 8, so rank 1
    runs a padding batch in the last round. The mean is still the exact mean over the 1000."""
    run_dir, _ = evaluated_run
    plan = load_plan(run_dir)
    base = Path(plan.file).parent
    from safetensors.torch import load_file

    models = {}
    for m in plan.models:
        torch.manual_seed(model_seed(plan.settings.seed, m.name))
        model = sources.build(m.source, builtins.MODELS, base)
        if m.trained:  # the weights the last evaluation saw: those exported
            model.load_state_dict(load_file(str(run_dir / "models" / m.name / "model.safetensors")))
        models[m.name] = model
    expected = evaluate_whole(plan, models)
    last = rows(run_dir, "eval")[-1]
    got = {**last["losses"], **last["terms"], **last["stats"]}
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6, rel=1e-6), name


@pytest.mark.runtime
def test_evaluating_changes_nothing_in_training(evaluated_run, plain_run):
    with_eval = [r["losses"] for r in rows(evaluated_run[0], "train")]
    without = [r["losses"] for r in rows(plain_run, "train")]
    assert with_eval == without  # bit for bit: eval mode, no_grad, its own loaders, no RNG drawn


@pytest.mark.runtime
def test_trackers_hold_what_metrics_jsonl_holds(evaluated_run, monkeypatch):
    """TensorBoard's events read back with tensorboard's own reader, the MLflow store with
    mlflow's client, the W&B offline run's files: the same values at the same steps as
    metrics.jsonl, and the plan logged as the run's parameters."""
    run_dir, _ = evaluated_run
    train, evals = rows(run_dir, "train"), rows(run_dir, "eval")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    tb = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    assert tb["train/kd"] == pytest.approx({r["step"]: r["losses"]["kd"] for r in train}, rel=1e-6)
    assert tb["eval/kd"] == pytest.approx({r["step"]: r["losses"]["kd"] for r in evals}, rel=1e-6)
    assert tb["eval/kd/ce.accuracy"] == pytest.approx({r["step"]: r["stats"]["kd/ce.accuracy"] for r in evals})
    assert set(tb["lr/student"]) == {r["step"] for r in train}

    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    client = mlflow.tracking.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("dsgraph").experiment_id])
    assert run.info.status == "FINISHED"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/kd")}
    assert history == pytest.approx({r["step"]: r["losses"]["kd"] for r in evals}, rel=1e-6)
    assert run.data.params["pipeline"] == "distill"  # the resolved plan, flattened
    assert (run_dir / "wandb").is_dir() and list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.runtime
def test_rank_metrics_are_each_ranks_own_losses_whose_mean_is_logged(evaluated_run):
    run_dir, _ = evaluated_run
    mean = {r["step"]: r["losses"]["kd"] for r in rows(run_dir, "train")}
    per_rank = [
        {r["step"]: r["losses"]["kd"] for r in map(json.loads, (run_dir / "ranks" / f"rank{k}.metrics.jsonl").open())}
        for k in range(2)
    ]
    assert set(per_rank[0]) == set(per_rank[1]) == set(mean)
    for step, value in mean.items():
        assert per_rank[0][step] != per_rank[1][step]  # each rank's own micro batch
        assert (per_rank[0][step] + per_rank[1][step]) / 2 == pytest.approx(value, rel=1e-6)


def test_eval_shard_covers_every_sample_once_and_pads_the_last_round():
    dataset = TensorDataset(torch.arange(37))
    shards = [data.EvalShard(dataset, 4, rank, 3) for rank in range(3)]
    assert {len(s) for s in shards} == {4}  # 10 batches over 3 ranks: 4 rounds for everyone
    counted = [i for s in shards for batch, w in zip(s.indices, s.weights, strict=True) if w for i in batch]
    assert sorted(counted) == list(range(37))
    assert [s.weights[-1] for s in shards] == [1, 0, 0]  # batch 9 holds 1 sample; ranks 1, 2 pad
    assert sum(sum(s.weights) for s in shards) == 37


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("size", [37, 64, 5])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_unshuffled_batches_are_those_of_accelerates_prepared_dataloader(size, world, drop_last):
    """`shuffle = false`: the batches Accelerate's prepare() of DataLoader(shuffle=False) deals
    each process (its BatchSamplerShard, even_batches), for both drop_last settings."""
    from accelerate.data_loader import BatchSamplerShard

    dataset = TensorDataset(torch.arange(size))
    micro = 4
    for rank in range(world):
        batches = BatchSampler(SequentialSampler(dataset), micro, drop_last)
        theirs = list(BatchSamplerShard(batches, world, rank, even_batches=True))
        ours = data.RankBatchSampler(dataset, micro, seed=0, rank=rank, world=world, shuffle=False, drop_last=drop_last)
        assert list(ours) == theirs
        assert len(ours) == len(theirs)


def test_shuffled_batches_drop_last_false_complete_the_epoch_as_accelerate_does():
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import RandomSampler

    dataset = TensorDataset(torch.arange(37))
    for rank in range(2):
        generator = torch.Generator().manual_seed(5)
        theirs = list(BatchSamplerShard(BatchSampler(RandomSampler(dataset, generator=generator), 4, False), 2, rank))
        ours = data.RankBatchSampler(dataset, 4, seed=5, rank=rank, world=2, shuffle=True, drop_last=False)
        assert list(ours) == theirs
