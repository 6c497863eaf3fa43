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
