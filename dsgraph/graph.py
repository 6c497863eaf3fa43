"""IR -> a networkx graph of data, model, generation, model-call, reward, loss-term and loss nodes.

Edges carry a `kind`: `input` (a value flows), `weights` (a model's parameters feed its call or
its generation),
`term` (a weighted term of a loss) and `trains` (a `train` statement: loss -> model). The
dataflow view (everything but `trains`) is acyclic once the checks pass; its lexicographic
topological order is the evaluation order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import networkx as nx

from dsgraph import ir

Graph: TypeAlias = "nx.DiGraph[str]"  # node ids: `data:train`, `call:student(train.x)`, ...


def data_id(name: str) -> str:
    return f"data:{name}"


def model_id(name: str) -> str:
    return f"model:{name}"


def loss_id(name: str) -> str:
    return f"loss:{name}"


def call_id(call: ir.ModelCall) -> str:
    return f"call:{ir.show_expr(call)}"


def generation_id(name: str) -> str:
    return f"gen:{name}"


def reward_id(call: ir.RewardCall) -> str:
    return f"reward:{ir.show_expr(call)}"


@dataclass(frozen=True)
class Term:
    """One addend of a loss: `weight * expr` (weight 1.0 when the addend has no constant factor)."""

    weight: float
    expr: ir.LossExpr


def split_terms(expr: ir.LossExpr) -> list[Term]:
    """`4.0 * kl(a, b) + ce(a, y) - 0.5 * aux` -> [(4.0, kl), (1.0, ce), (-0.5, aux)]."""
    match expr:
        case ir.BinOp(op="+", left=left, right=right):
            return split_terms(left) + split_terms(right)
        case ir.BinOp(op="-", left=left, right=right):
            return split_terms(left) + [Term(-t.weight, t.expr) for t in split_terms(right)]
        case ir.Neg(operand=operand):
            return [Term(-t.weight, t.expr) for t in split_terms(operand)]
        case (
            ir.BinOp(op="*", left=ir.Const(value=int() | float() as c), right=other)
            | ir.BinOp(op="*", left=other, right=ir.Const(value=int() | float() as c))
        ) if _number(c):
            return [Term(c * t.weight, t.expr) for t in split_terms(other)] if _single(other) else [Term(c, other)]
        case ir.BinOp(op="/", left=left, right=ir.Const(value=int() | float() as c)) if _number(c) and c != 0:
            return [Term(t.weight / c, t.expr) for t in split_terms(left)] if _single(left) else [Term(1 / c, left)]
    return [Term(1.0, expr)]


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _single(expr: ir.LossExpr) -> bool:
    return len(split_terms(expr)) == 1


def build(pipeline: ir.Pipeline) -> Graph:
    """The graph stage; the graph is frozen (networkx raises on any change)."""
    graph: Graph = nx.DiGraph(name=pipeline.name)
    for data in pipeline.data.values():
        graph.add_node(data_id(data.name), kind="data", name=data.name, span=data.span)
    for model in pipeline.models.values():
        graph.add_node(model_id(model.name), kind="model", name=model.name, span=model.span, frozen=model.frozen)
    for gen in pipeline.generations.values():
        graph.add_node(generation_id(gen.name), kind="generation", name=gen.name, model=gen.model, span=gen.span)
        if gen.model in pipeline.models:
            graph.add_edge(model_id(gen.model), generation_id(gen.name), kind="weights")
        if gen.data in pipeline.data:
            graph.add_edge(data_id(gen.data), generation_id(gen.name), kind="input", field="attention_mask,input_ids")
    for loss in pipeline.losses.values():
        graph.add_node(loss_id(loss.name), kind="loss", name=loss.name, span=loss.span)
    for loss in pipeline.losses.values():
        for index, term in enumerate(split_terms(loss.expr)):
            term_id = f"term:{loss.name}#{index}"
            graph.add_node(
                term_id,
                kind="term",
                loss=loss.name,
                weight=term.weight,
                text=ir.show_expr(term.expr),
                expr=term.expr,
                span=term.expr.span,
            )
            graph.add_edge(term_id, loss_id(loss.name), kind="term", weight=term.weight)
            _add_inputs(graph, term.expr, term_id, pipeline)
    for data in pipeline.data.values():  # `eval = val`: evaluation reads `val` in `train`'s place
        if data.eval is not None and data.eval in pipeline.data:
            graph.add_edge(data_id(data.name), data_id(data.eval), kind="eval")
    for train in pipeline.trains:
        for name in train.models:
            if name in pipeline.models and train.loss in pipeline.losses:
                graph.add_edge(loss_id(train.loss), model_id(name), kind="trains", train=train.index)
    frozen: Graph = nx.freeze(graph)
    return frozen


def _add_inputs(graph: Graph, expr: ir.LossExpr, consumer: str, pipeline: ir.Pipeline) -> None:
    for node in ir.walk_inputs(expr):
        match node:
            case ir.FieldRef(data=d, field=f):
                known = graph.edges[data_id(d), consumer]["field"] if graph.has_edge(data_id(d), consumer) else ""
                fields = sorted(set(known.split(",") if known else []) | {f})
                graph.add_edge(data_id(d), consumer, kind="input", field=",".join(fields))
            case ir.LossRef(name=n):
                if n in pipeline.losses:
                    graph.add_edge(loss_id(n), consumer, kind="input")
            case ir.Generated(generation=gen, field=f):
                if gen in pipeline.generations:
                    source = generation_id(gen)
                    known = graph.edges[source, consumer]["field"] if graph.has_edge(source, consumer) else ""
                    fields = sorted(set(known.split(",") if known else []) | {f or "*"})
                    graph.add_edge(source, consumer, kind="input", field=",".join(fields))
            case ir.RewardCall(reward=r, generation=gen):
                rid = reward_id(node)
                if rid not in graph:
                    graph.add_node(rid, kind="reward", reward=r, call=node, text=ir.show_expr(node), span=node.span)
                    if gen in pipeline.generations:
                        graph.add_edge(generation_id(gen), rid, kind="input", field="*")
                graph.add_edge(rid, consumer, kind="input")
            case ir.ModelCall(model=m):
                cid = call_id(node)
                if cid not in graph:
                    graph.add_node(cid, kind="call", model=m, call=node, text=ir.show_expr(node), span=node.span)
                    if m in pipeline.models:
                        graph.add_edge(model_id(m), cid, kind="weights")
                    for arg in ir.call_arguments(node):
                        _add_inputs(graph, arg, cid, pipeline)
                graph.add_edge(cid, consumer, kind="input")


def dataflow(graph: Graph) -> Graph:
    """The graph without `trains` and `eval` edges: what is computed from what. A copy, not a
    view: a filtered view costs O(nodes) per `len()`, which makes traversals quadratic."""
    flow: Graph = nx.DiGraph()
    flow.add_nodes_from(graph.nodes)
    flow.add_edges_from((u, v) for u, v, data in graph.edges(data=True) if data["kind"] not in ("trains", "eval"))
    return flow


def show(graph: Graph) -> str:
    """The deterministic text form (`--emit graph`)."""
    lines = [f"graph {graph.graph.get('name', '')}"]
    for node in sorted(graph.nodes):
        attrs = graph.nodes[node]
        extra = ""
        if attrs["kind"] == "model":
            extra = " frozen" if attrs["frozen"] else ""
        elif attrs["kind"] == "generation":
            extra = f" by {attrs['model']}"
        elif attrs["kind"] == "term":
            extra = f" weight={attrs['weight']:g} {attrs['text']}"
        lines.append(f"  node {node}{extra}")
    for u, v in sorted(graph.edges):
        attrs = graph.edges[u, v]
        label = "".join(f" {k}={attrs[k]}" for k in ("field", "weight", "train") if k in attrs)
        lines.append(f"  edge {u} -> {v} [{attrs['kind']}{label}]")
    return "\n".join(lines) + "\n"
