"""The graph in DOT: one cluster per Accelerator or native engine group, frozen and trained
models styled apart, ZeRO stage and precision on each model, loss weights on the edges."""

from __future__ import annotations


from dsgraph.graph import Graph
from dsgraph.plan import Engine, Plan


def _q(text: str) -> str:
    """A quoted DOT string; a newline in `text` becomes DOT's line break."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _attrs(**attrs: object) -> str:
    return "[" + ", ".join(f"{k}={_q(str(v))}" for k, v in attrs.items()) + "]"


def to_dot(graph: Graph, plan: Plan) -> str:
    models = {m.name: m for m in plan.models}
    out = [
        f"digraph {_q(plan.pipeline)} {{",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=10];',
    ]
    clusters: dict[str, list[str]] = {}
    for name, m in models.items():
        if plan.engine_of(m) is Engine.ACCELERATE:
            key = f"Accelerator {m.accelerator}"
        elif m.group is not None:
            key = f"deepspeed.initialize (group {m.group})"
        else:
            key = "deepspeed.initialize (inference)"
        clusters.setdefault(key, []).append(name)
    for index, (label, names) in enumerate(sorted(clusters.items())):
        out.append(f"  subgraph cluster_{index} {{")
        out.append(f'    label={_q(label)}; style="rounded,dashed"; color="gray40";')
        for name in sorted(names):
            m = models[name]
            trained = m.trained
            out.append(
                f"    {_q('model:' + name)} "
                + _attrs(
                    label=f"{name}\n{m.role.value} · ZeRO-{m.stage.value} · {m.precision.value}",
                    shape="box",
                    style="filled,bold" if trained else "filled,dashed",
                    fillcolor="#cfe8ff" if trained else "#eeeeee",
                )
            )
        out.append("  }")
    for node in sorted(graph.nodes):
        attrs = graph.nodes[node]
        kind = attrs["kind"]
        if kind == "model":
            if attrs["name"] not in models:
                out.append(f"  {_q(node)} " + _attrs(label=f"{attrs['name']}\nunused", shape="box", style="dotted"))
            continue
        if kind == "data":
            out.append(f"  {_q(node)} " + _attrs(label=attrs["name"], shape="cylinder"))
        elif kind == "call":
            out.append(f"  {_q(node)} " + _attrs(label=attrs["text"], shape="ellipse"))
        elif kind == "generation":  # its own kind: sampled every step, from the model's weights
            gen = plan.generation(attrs["name"]) if attrs["name"] in {g.name for g in plan.generations} else None
            detail = f"\n{gen.samples} per prompt · ≤ {gen.max_new_tokens} tokens" if gen else ""
            out.append(
                f"  {_q(node)} "
                + _attrs(
                    label=f"generate {attrs['name']}{detail}",
                    shape="hexagon",
                    style="filled,bold",
                    fillcolor="#d9f2d9",
                )
            )
        elif kind == "reward":
            out.append(
                f"  {_q(node)} " + _attrs(label=attrs["text"], shape="invhouse", style="filled", fillcolor="#fff2b3")
            )
        elif kind == "term":
            out.append(f"  {_q(node)} " + _attrs(label=attrs["text"], shape="note"))
        elif kind == "loss":
            out.append(
                f"  {_q(node)} "
                + _attrs(label=attrs["name"], shape="doubleoctagon", style="filled", fillcolor="#ffe6cc")
            )
    for u, v in sorted(graph.edges):
        e = graph.edges[u, v]
        match e["kind"]:
            case "term":
                extra = _attrs(label=f"× {e['weight']:g}")  # noqa: RUF001 - a multiplication sign
            case "trains":
                extra = _attrs(label="trains", style="bold", color="#1f77b4", constraint="false")
            case "weights" if v.startswith("gen:"):
                extra = _attrs(label="samples", style="bold", color="#2ca02c")
            case "weights":
                extra = _attrs(style="dotted", arrowhead="none")
            case "eval":
                extra = _attrs(label="eval set", style="dashed", color="gray40")
            case _:
                extra = _attrs(label=e["field"]) if "field" in e else ""
        out.append(f"  {_q(u)} -> {_q(v)} {extra}".rstrip())
    out.append("}")
    return "\n".join(out) + "\n"
