"""What the graph decides: each model's role, the train groups, which calls need gradients for
which group, and where a value must be detached so that one group's backward stays its own."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

import networkx as nx

from dsgraph.graph import Graph
from dsgraph import graph as g
from dsgraph import ir


class Role(str, Enum):
    TRAINED = "trained"
    FROZEN = "frozen"  # declared `frozen`, or used but never trained (DSG309)
    UNUSED = "unused"


@dataclass(frozen=True)
class Group:
    """One `train` statement: the models its loss updates. `shared` when there are several."""

    index: int
    models: tuple[str, ...]
    loss: str
    reach: frozenset[str]  # the dataflow nodes the loss depends on

    @property
    def shared(self) -> bool:
        return len(self.models) > 1


@dataclass(frozen=True)
class Analysis:
    order: tuple[str, ...]  # evaluation order of all dataflow nodes
    position: dict[str, int]  # node -> its index in `order`
    roles: dict[str, Role]
    groups: tuple[Group, ...]
    call_groups: dict[str, frozenset[int]]  # call id -> the groups whose gradients pass through it
    group_of_model: dict[str, int]
    reached: frozenset[str]  # the dataflow nodes some train group depends on
    # Evaluation: the reached losses all of whose data sets have an eval set, in evaluation order,
    # and those that read data sets with and without one (not evaluated, DSG314).
    evaluated: tuple[str, ...] = ()
    partly_evaluated: tuple[str, ...] = ()

    def group(self, index: int) -> Group | None:
        return next((grp for grp in self.groups if grp.index == index), None)

    def in_order(self, nodes: Iterable[str], prefix: str) -> list[str]:
        """The nodes that start with `prefix`, in evaluation order."""
        return sorted((n for n in nodes if n.startswith(prefix)), key=self.position.__getitem__)

    def detached_inputs(self, consumer: str, group: int | None, graph: Graph) -> list[str]:
        """Calls feeding `consumer` whose gradients belong to another group: passed detached."""
        out = []
        for pred in sorted(graph.predecessors(consumer)):
            owners = self.call_groups.get(pred, frozenset())
            if owners and group not in owners:
                out.append(pred)
        return out


def analyse(pipeline: ir.Pipeline, graph: Graph) -> Analysis | None:
    """The analysis stage; None when losses refer to each other in a cycle (DSG305): nothing is
    computed before anything else then."""
    flow = g.dataflow(graph)
    if not nx.is_directed_acyclic_graph(flow):
        return None
    order = tuple(nx.lexicographical_topological_sort(flow))
    trains = [t for t in pipeline.trains if t.loss in pipeline.losses and any(m in pipeline.models for m in t.models)]
    groups = tuple(
        Group(
            t.index,
            tuple(m for m in t.models if m in pipeline.models),
            t.loss,
            frozenset(nx.ancestors(flow, g.loss_id(t.loss))) | {g.loss_id(t.loss)},
        )
        for t in trains
    )
    group_of_model: dict[str, int] = {}
    for group in groups:
        for name in group.models:
            group_of_model.setdefault(name, group.index)
    roles = {}
    for name, model in pipeline.models.items():
        if name in group_of_model and not model.frozen:
            roles[name] = Role.TRAINED
        elif any(True for _ in graph.successors(g.model_id(name))):
            roles[name] = Role.FROZEN
        else:
            roles[name] = Role.UNUSED
    call_groups: dict[str, frozenset[int]] = {}
    for node in order:
        if not node.startswith("call:"):
            continue
        model = graph.nodes[node]["model"]
        owners = set()
        for group in groups:
            if node not in group.reach:
                continue
            trains_model = model in group.models and roles.get(model) is Role.TRAINED
            if trains_model or any(group.index in call_groups.get(p, ()) for p in flow.predecessors(node)):
                owners.add(group.index)
        call_groups[node] = frozenset(owners)
    reached = frozenset().union(*(group.reach for group in groups))
    with_eval = {g.data_id(d.name) for d in pipeline.data.values() if d.eval is not None}
    held_out = {g.data_id(d.eval) for d in pipeline.data.values() if d.eval is not None}  # DSG312 if read
    evaluated, partly = [], []
    for node in order:
        if node.startswith("loss:") and node in reached:
            ancestors = nx.ancestors(flow, node)
            if any(n.startswith("gen:") for n in ancestors):
                continue  # on-policy: it reads what a generation sampled (DSG325 for an eval set)
            read = {n for n in ancestors if n.startswith("data:")} - held_out
            if read and read <= with_eval:
                evaluated.append(graph.nodes[node]["name"])
            elif read & with_eval:
                partly.append(graph.nodes[node]["name"])
    return Analysis(
        order,
        {n: i for i, n in enumerate(order)},
        roles,
        groups,
        call_groups,
        group_of_model,
        reached,
        tuple(evaluated),
        tuple(partly),
    )
