"""Factories that declare a keyword parameter `run` get the run's context (seed, rank, world
size, micro batch); the others are called as written."""

from __future__ import annotations

import sys

from dsgraph.context import RunContext
from dsgraph.plan import Source, SourceKind
from dsgraph.runtime import sources
from dsgraph.source import Span

SPAN = Span("t.dsg", 1, 1, 1, 2)


def test_a_factory_that_asks_for_the_run_gets_it_and_others_do_not(tmp_path, monkeypatch):
    (tmp_path / "ctxfactories.py").write_text(
        "def shard(n, *, run):\n"
        "    return list(range(n))[run.rank :: run.world_size]\n"
        "def plain(n):\n"
        "    return n\n"
        "def explicit(n, run=None):\n"
        "    return run\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = RunContext(seed=3, rank=1, world_size=2, micro_batch=4, grad_accum=1)
    try:
        shard = Source(SourceKind.FACTORY, "ctxfactories:shard", (("n", 6),), SPAN)
        assert sources.build(shard, {}, tmp_path, run=run) == [1, 3, 5]
        plain = Source(SourceKind.FACTORY, "ctxfactories:plain", (("n", 6),), SPAN)
        assert sources.build(plain, {}, tmp_path, run=run) == 6
        given = Source(SourceKind.FACTORY, "ctxfactories:explicit", (("n", 6), ("run", "mine")), SPAN)
        assert sources.build(given, {}, tmp_path, run=run) == "mine"  # the .dsg call's own `run=` wins
    finally:
        sys.modules.pop("ctxfactories", None)


def test_a_collate_factory_is_named_in_the_plan_and_shapes_the_batches(tmp_path, monkeypatch):
    """`collate = pkg.mod:make(...)` in a data block: the plan carries it; the loader dsgraph
    deals batches with calls what the factory returns on each batch's samples."""
    import torch

    from dsgraph.compiler import compile_file
    from dsgraph.runtime import data
    from dsgraph.runtime.builtins import synthetic_classification

    (tmp_path / "collating.py").write_text(
        "import torch\n\n\ndef make(scale):\n"
        "    def collate(samples):\n"
        "        stacked = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}\n"
        "        return {**stacked, 'x': stacked['x'] * scale}\n"
        "    return collate\n"
    )
    (tmp_path / "p.dsg").write_text(
        "pipeline p {\n"
        "    steps = 2\n"
        "    micro_batch = 4\n"
        "    data train = builtin.synthetic_classification(samples=32, features=4, classes=2) {\n"
        "        collate = collating:make(scale=2.0)  shuffle = false\n"
        "    }\n"
        "    model m = builtin.mlp(inputs=4, outputs=2) { zero = { stage = 2 }  optimizer = sgd(lr=0.1) }\n"
        "    loss l = ce(m(train.x), train.y)\n"
        "    train m on l\n"
        "}\n"
    )
    result = compile_file(str(tmp_path / "p.dsg"))
    assert result.ok and result.plan is not None
    declared = result.plan.data_set("train")
    assert declared.collate is not None and declared.collate.target == "collating:make"
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        collate = sources.build(declared.collate, {}, tmp_path)
        dataset = synthetic_classification(32, 4, 2)
        loader = data.sharded_loader(dataset, 4, 0, 0, 1, shuffle=False, collate=collate)
        first = next(iter(loader))
        assert torch.equal(first["x"], dataset.columns["x"][:4] * 2.0)
    finally:
        sys.modules.pop("collating", None)
