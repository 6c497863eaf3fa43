"""The plan as text: readable, deterministic and aligned (`dsgraph compile`)."""
from __future__ import annotations

import json
from typing import Any

from dsgraph.plan import Plan


def _fmt_span(span: dict) -> str:
    return f"line {span['line']}"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _flat(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(config, dict) and config:
        out = []
        for key in config:
            out += _flat(config[key], f"{prefix}.{key}" if prefix else key)
        return out
    return [(prefix, json.dumps(config))]


def _lora_text(lora: dict | None) -> str:
    if not lora:
        return ""
    targets = ",".join(lora["targets"]) if lora["targets"] else "default targets"
    return f" + lora(r={lora['r']}, alpha={lora['alpha']:g}, {targets})"


def to_text(plan: Plan) -> str:
    d = plan.data
    s = d["settings"]
    world = d["world_size"] if d["world_size"] is not None else "set at launch"
    length = f"{s['steps']} steps" if s["steps"] is not None else f"{s['epochs']} epochs"
    out = [f"plan {d['pipeline']}  ({d['file']}, digest {d['digest']})",
           f"  {length}, micro_batch {s['micro_batch']} per process, grad_accum {s['grad_accum']}, "
           f"seed {s['seed']}, world size {world}", ""]
    out.append("models")
    rows = [["name", "role", "engine", "acc", "zero", "precision", "group", "source"]]
    for m in d["models"]:
        src = m["source"]
        rows.append([m["name"], m["role"], m["engine"], "-" if m["accelerator"] is None else str(m["accelerator"]),
                     f"stage {m['stage']}", m["precision"], "-" if m["group"] is None else str(m["group"]),
                     f"{src['kind']}:{src['target']}" + _lora_text(m.get("lora"))])
    out += _table(rows)
    out += [f"  {m['name']}: {m['zero_auto']}" for m in d["models"] if m.get("zero_auto")] + [""]
    out.append("groups")
    for grp in d["groups"]:
        kind = "shared loss" if grp["shared"] else "single"
        out.append(f"  {grp['index']}  train {', '.join(grp['models'])} on {grp['loss']}  "
                   f"[{kind}, {grp['engine']}: {grp['reason']}]")
    if d["frozen_engine"]:
        out.append(f"  frozen models: {d['frozen_engine']}: {d['frozen_reason']}")
    out += ["", "setup"]
    rows = []
    for st in d["setup"]:
        rows.append([f"{st['id']:>2}", st["op"], _setup_detail(st), _fmt_span(st["span"])])
    out += _table(rows) + ["", "each step"]
    rows = []
    for st in d["step"]:
        rows.append([st["op"], _step_detail(st), _fmt_span(st["span"])])
    out += _table(rows) + [""]
    out.append("losses")
    out += _table([[name, "=", loss["text"]] for name, loss in d["losses"].items()]) + [""]
    for m in d["models"]:
        out.append(f"deepspeed config of {m['name']}")
        rows = [[k, v + (f"   # at run time: {m['runtime_auto'][k]}" if k in m["runtime_auto"] else "")]
                for k, v in _flat(m["deepspeed_config"])]
        out += _table(rows) + [""]
    return "\n".join(out).rstrip() + "\n"


def _setup_detail(st: dict) -> str:
    match st["op"]:
        case "create_accelerator":
            plugins = f" plugins=[{', '.join(st['plugins'])}]" if st["plugins"] else " (plugins shared)"
            mp = f" mixed_precision={st['mixed_precision']}" if "mixed_precision" in st else ""
            return f"acc{st['accelerator']}{plugins}{mp}"
        case "select_plugin":
            return st["model"] + (f"  ({st['why']})" if "why" in st else "")
        case "build_model":
            return st["model"] + ("  under zero.Init" if st["zero_init"] else "") + \
                ("  + LoRA adapter (base weights frozen)" if st.get("lora") else "")
        case "prepare":
            return f"{st['model']} on acc{st['accelerator']}: {', '.join(st['objects'])}" \
                   + ("  (eval)" if st.get("eval") else "")
        case "initialize":
            return f"{st['model']}: {', '.join(st['objects'])}" + ("  (eval)" if st["eval"] else "")
        case "shard_data":
            return f"{st['data']} (each rank its own shard, in Accelerate's order)"
    return ""


def _step_detail(st: dict) -> str:
    match st["op"]:
        case "forward":
            mode = "no_grad" if st["no_grad"] else f"grad -> group {st['grad_group']}"
            detach = f"  detach {', '.join(st['detach'])}" if st["detach"] else ""
            return f"{st['call']}  [{mode}]{detach}"
        case "losses":
            detach = f"  detach {', '.join(st['detach'])}" if st["detach"] else ""
            return f"group {st['group']}: {', '.join(st['losses'])}{detach}"
        case "backward":
            return f"group {st['group']}: {st['loss']} -> {', '.join(st['models'])} ({st['engine']})"
        case "optimizer_step":
            return f"group {st['group']}: step + zero_grad {', '.join(st['models'])}"
    return ""
