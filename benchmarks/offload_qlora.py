"""ZeRO-3 with CPU offload through dsgraph, and QLoRA (a 4-bit bitsandbytes base with LoRA) on
DeepSpeed, measured on this machine (CPU, 2 processes).

    .venv/bin/python benchmarks/offload_qlora.py [--part offload|qlora|all] [--steps 6] [--work DIR]

Offload: one tiny pipeline (a trained mlp(32 -> 256 -> 256 -> 8), ZeRO-3, AdamW, persistence
threshold 0) run by `dsgraph run --procs 2` four ways: plain ZeRO-3; `offload_optimizer = cpu`;
`offload_optimizer = cpu` + `offload_param = cpu`; and the latter with DeepSpeed's own CPU Adam
(`torch_adam: false` in a JSON config; dsgraph's default on CPU is torch's AdamW, which never
builds the op). Prints the losses of each against the plain run, `dsgraph compile --memory`'s
estimate (device and host bytes) against what each rank measured (ranks/rankN.json "memory"),
and whether and how long DeepSpeed's `cpu_adam` op took to build, and where it is cached.

QLoRA: needs `bitsandbytes` importable (not a dsgraph dependency; `pip install bitsandbytes`, or
PYTHONPATH pointing at a `pip install --target` folder); skipped with a message otherwise. Writes a
tiny GPT-2 (2 layers, width 64, no dropout), then in one 2-process `torch.distributed.run` job:
4-bit loads with each quant storage dtype, LoRA (PEFT) on them, `deepspeed.initialize` at ZeRO-3
(and ZeRO-2) against a plain single-process replica of the same work, the bytes each rank holds
against the rule `bnb_4bit_quant_storage` implies, and the cases that fail, with their error and
the library line that raised it.

Measured here (2 cores, torch 2.13.0+cpu, DeepSpeed 0.19.8, Transformers 5.24.0, PEFT 0.21.2,
bitsandbytes 0.50.2): the three offload variants give the plain ZeRO-3 losses bit for bit (torch's
AdamW), DeepSpeedCPUAdam within 1.4e-6; every category's estimate (device + host) equals what each
rank measured, but for the 4-byte step tensor of torch's AdamW (`host` is measured 0 on CPU: the
model's device is the host). The first build of `cpu_adam` took 93 s (ninja's log, 2 busy cores).
QLoRA runs on CPU at ZeRO-2 and ZeRO-3 and matches the replica (4.8e-7); a float quant storage other
than a bf16/fp16 engine's dtype fails; a 4-bit load inside `zero.Init` fails; eval-mode forwards
at ZeRO-3 are silently wrong unless bitsandbytes' CPU repacking is switched off."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2

# -- offload through dsgraph ---------------------------------------------------------------------

PIPELINE = """pipeline offload {{
    seed = 0
    steps = {steps}
    micro_batch = 16
    grad_accum = 1
    log_every = 1

    data train = builtin.synthetic_classification(samples=512, features=32, classes=8)

    {zero}

    model student = builtin.mlp(inputs=32, hidden=[256, 256], outputs=8) {{
        zero = z
{optimizer}    }}

    loss l = ce(student(train.x), train.y)
    train student on l
}}
"""
ADAMW = "        optimizer = adamw(lr=5e-3, weight_decay=0.01)\n"
CPU_ADAM_CONFIG = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    },
    # The same AdamW as `adamw(lr=5e-3, weight_decay=0.01)`, but DeepSpeed's own: torch_adam false.
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 5e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": False},
    },
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
}
VARIANTS = {
    "zero3": ("zero z {\n        stage = 3\n        stage3_param_persistence_threshold = 0\n    }", ADAMW),
    "zero3+offload_optimizer": (
        "zero z {\n        stage = 3\n        stage3_param_persistence_threshold = 0\n"
        "        offload_optimizer = cpu\n    }",
        ADAMW,
    ),
    "zero3+offload_optimizer+offload_param": (
        "zero z {\n        stage = 3\n        stage3_param_persistence_threshold = 0\n"
        "        offload_optimizer = cpu\n        offload_param = cpu\n    }",
        ADAMW,
    ),
    "same, DeepSpeedCPUAdam": ('zero z = file("cpu_adam.json")', ""),
}
CATEGORIES = ("params", "grads", "optimizer_states")


def _tool(name: str) -> str:
    # As the workers see it: the environment's bin first (dsgraph.runtime.env.worker_environment).
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        return f"{name}: not found"
    done = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return f"{name}: {path} ({(done.stdout or done.stderr).splitlines()[0].strip()})"


def _op_cache() -> Path:
    """The op cache dsgraph's workers use (dsgraph.runtime.env), the venv's bin first on PATH."""
    from dsgraph.runtime.env import extensions_dir

    return Path(
        os.environ.get("TORCH_EXTENSIONS_DIR")
        or extensions_dir(os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    )


def _ninja_seconds(folder: Path, target: str) -> float | None:
    """How long the last build of `target` took, from ninja's log (ms since the build started)."""
    log = folder / ".ninja_log"
    if not log.is_file():
        return None
    rows = [line.split("\t") for line in log.read_text().splitlines() if not line.startswith("#")]
    ends = [int(row[1]) for row in rows if len(row) >= 4 and row[3] == target]
    return ends[-1] / 1000 if ends else None


def run_offload(work: Path, steps: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "cpu_adam.json").write_text(json.dumps(CPU_ADAM_CONFIG, indent=2))
    cache = _op_cache()
    so = cache / "cpu_adam" / "cpu_adam.so"
    out: dict[str, Any] = {
        "tools": [_tool("c++"), _tool("ninja")],
        "op_cache": str(cache),
        "cpu_adam_cached_before": so.is_file(),
        "variants": {},
    }
    for name, (zero, optimizer) in VARIANTS.items():
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        dsg = work / f"{slug}.dsg"
        dsg.write_text(PIPELINE.format(steps=steps, zero=zero, optimizer=optimizer))
        compile_memory = ["compile", str(dsg), "--memory", "--world-size", str(WORLD), "--format", "json"]
        est = subprocess.run(
            [sys.executable, "-m", "dsgraph", *compile_memory],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        estimate = json.loads(est.stdout)["models"][0]
        run_dir = work / f"run-{slug}"
        before = so.stat().st_mtime if so.is_file() else None
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dsgraph", "run", str(dsg), "--procs", str(WORLD), "--run-dir", str(run_dir)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        wall = time.perf_counter() - start
        result: dict[str, Any] = {"exit": done.returncode, "wall_s": round(wall, 1), "estimate": estimate}
        if done.returncode != 0:
            result["error"] = (done.stdout + done.stderr)[-3000:]
            out["variants"][name] = result
            continue
        setup = re.search(r"setup ([0-9.]+) s", done.stdout)
        result["setup_s"] = float(setup.group(1)) if setup else None
        result["losses"] = [json.loads(line)["losses"]["l"] for line in (run_dir / "metrics.jsonl").open()]
        result["measured"] = [
            json.loads((run_dir / "ranks" / f"rank{r}.json").read_text())["memory"]["student"] for r in range(WORLD)
        ]
        result["optimizer_params"] = json.loads(next((run_dir / "deepspeed_configs").glob("*.json")).read_text())[
            "optimizer"
        ]["params"]
        after = so.stat().st_mtime if so.is_file() else None
        if after is not None and after != before:
            result["cpu_adam_built_s"] = _ninja_seconds(so.parent, "cpu_adam.so")
        out["variants"][name] = result
    return out


def report_offload(out: dict[str, Any]) -> None:
    print("== ZeRO-3 offload through dsgraph (2 processes, CPU)")
    for line in out["tools"]:
        print(f"  {line}")
    print(f"  op cache: {out['op_cache']} (cpu_adam built before this run: {out['cpu_adam_cached_before']})")
    base = out["variants"]["zero3"].get("losses")
    for name, v in out["variants"].items():
        print(f"  -- {name}: exit {v['exit']}, {v['wall_s']} s wall, setup {v.get('setup_s')} s")
        if "error" in v:
            print("     FAILED:", v["error"].strip().splitlines()[-1])
            continue
        adam = "torch.optim.AdamW" if v["optimizer_params"].get("torch_adam") else "DeepSpeedCPUAdam"
        print(f"     optimizer: {adam}", end="")
        if "cpu_adam_built_s" in v:
            print(f"; cpu_adam op built in this run: {v['cpu_adam_built_s']:.1f} s (ninja's log)", end="")
        print()
        print("     losses:", ", ".join(f"{x:.9g}" for x in v["losses"]))
        if base and v["losses"] is not base:
            worst = max(abs(a - b) for a, b in zip(v["losses"], base, strict=True))
            print(f"     max |loss - zero3 loss|: {worst:.3g}")
        e = v["estimate"]
        host = e.get("host", {})
        print(f"     {'category':<17}{'est. device':>12}{'est. host':>12}{'est. sum':>12}  measured rank0 / rank1")
        for c in CATEGORIES:
            measured = " / ".join(str(m[c]) for m in v["measured"])
            print(f"     {c:<17}{e[c]:>12}{host.get(c, 0):>12}{e[c] + host.get(c, 0):>12}  {measured}")
        host_measured = " / ".join(str(m["host"]) for m in v["measured"])
        total = e["total"] + e.get("host_total", 0)
        print(f"     {'total':<17}{e['total']:>12}{e.get('host_total', 0):>12}{total:>12}  ", end="")
        print(" / ".join(str(m["total"]) for m in v["measured"]), f"(measured 'host': {host_measured})")


# -- QLoRA ------------------------------------------------------------------------------------------

TARGETS = ["c_attn", "c_proj", "c_fc"]


def write_tiny_gpt2(folder: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 256, "n_positions": 64}
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    config = GPT2Config(**sizes, **no_dropout, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)


def _where(error: BaseException) -> str:
    """The innermost library frame of a traceback: file (from site-packages on) and line."""
    frames = traceback.extract_tb(error.__traceback__)
    frame = frames[-1]
    name = frame.filename.split("site-packages/")[-1]
    return f"{name}:{frame.lineno} ({frame.name}): {(frame.line or '').strip()}"


def qlora_worker(work: Path, steps: int) -> None:
    """One rank of the QLoRA job (under torch.distributed.run). Rank 0 writes work/qlora.json."""
    from dsgraph.runtime.env import worker_environment

    world = int(os.environ["WORLD_SIZE"])
    os.environ.update(worker_environment(world))
    import bitsandbytes as bnb
    import deepspeed
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dsgraph.runtime.measure import measure

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
    model_dir = str(work / "tiny")
    tokens = torch.randint(0, 256, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    mine = tokens[2 * rank : 2 * rank + 2]  # each rank its own 2 rows; the replica takes all of them

    def config(stage: int, precision: str, offload: bool = False, optimizer: bool = True) -> dict[str, Any]:
        zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": 4096}
        if stage == 3:
            zero |= {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 4096}
        if offload:
            zero |= {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 2,
            "gradient_accumulation_steps": 1,
            "train_batch_size": 2 * world,
            "zero_optimization": zero,
            "bf16": {"enabled": precision == "bf16"},
            "steps_per_print": 10**9,
        }
        if optimizer:
            params = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}
            cfg["optimizer"] = {"type": "AdamW", "params": params}
        return cfg

    def load(storage: str, precision: str, init: dict[str, Any] | None = None) -> Any:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtypes[precision],
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_storage=dtypes[storage],
        )
        context = deepspeed.zero.Init(config_dict_or_path=init) if init else contextlib.nullcontext()
        with context:
            return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtypes[precision])

    def no_cpu_repack(model: Any) -> None:
        # bitsandbytes (0.50) repacks a Linear4bit's weight.data into a CPU layout on its first
        # forward in eval mode without grad (AVX512-BF16 CPUs); ZeRO-3 restores the old layout.
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False

    def lora(model: Any) -> Any:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))

    def quant_layout(model: Any, precision: str, storage: str) -> dict[str, Any]:
        """What was loaded, and the bytes per rank the storage rule predicts for ZeRO-3."""
        pb = 2 if precision == "bf16" else 4
        packed = [p for p in model.parameters() if isinstance(p, bnb.nn.Params4bit)]
        qstate = {}
        for p in packed:
            qs = p.quant_state
            for t in (qs.absmax, qs.code, *((qs.state2.absmax, qs.state2.code, qs.offset) if qs.nested else ())):
                qstate[t.data_ptr()] = t.numel() * t.element_size()
        quantized = sum(math.prod(p.quant_state.shape) for p in packed)
        sb = torch.empty((), dtype=dtypes[storage]).element_size()
        rule = 0
        for p in model.parameters():
            if isinstance(p, bnb.nn.Params4bit):
                n = math.prod(p.quant_state.shape)
                rule += math.ceil(math.ceil(n / 2 / sb) / world) * sb  # 4 bits each, packed into storage
            else:
                rule += math.ceil(p.numel() / world) * pb  # the engine casts floats to its precision
        return {
            "params4bit": sorted({f"{tuple(p.shape)} {p.dtype}" for p in packed}),
            "quantized_weights": quantized,
            "packed_bytes": sum(p.numel() * p.element_size() for p in packed),
            "quant_state_bytes": sum(qstate.values()),
            "params_rule_per_rank": rule,
        }

    def replica(storage: str, precision: str) -> list[float]:
        model = lora(load(storage, precision))
        model.train()
        no_cpu_repack(model)
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8
        )
        losses = []
        for _ in range(steps):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses

    def engine_case(
        storage: str, precision: str, stage: int, train_mode: bool = True, guard: bool = True, offload: bool = False
    ) -> dict[str, Any]:
        model = lora(load(storage, precision))
        layout = quant_layout(model, precision, storage)
        if train_mode:
            model.train()  # from_pretrained leaves the model in eval mode
        if guard:
            no_cpu_repack(model)
        trained = [p for p in model.parameters() if p.requires_grad]
        out: dict[str, Any] = {"layout": layout, "trainable": sum(p.numel() for p in trained)}
        cfg = config(stage, precision, offload)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=trained, config=cfg)
        out["offload"] = [bool(engine.zero_offload_optimizer()), bool(engine.zero_offload_param())]
        losses = []
        for i in range(steps):
            loss = engine(input_ids=mine, labels=mine).loss
            engine.backward(loss)
            if i == 1:  # as the second step begins, like dsgraph's measure
                out["measured"] = measure(engine)
            engine.step()
            mean = loss.detach().float().clone()
            torch.distributed.all_reduce(mean)
            losses.append((mean / world).item())
        out["losses"] = losses
        return out

    def frozen_case(guard: bool) -> dict[str, Any]:
        """A frozen 4-bit model at ZeRO-3 in eval mode under no_grad, three forwards, against the
        same model unsharded."""
        reference = load("fp32", "fp32")
        no_cpu_repack(reference)
        with torch.no_grad():
            expected = reference(input_ids=mine).logits
        model = load("fp32", "fp32")
        if guard:
            no_cpu_repack(model)
        engine, *_ = deepspeed.initialize(model=model, config=config(3, "fp32", optimizer=False))
        engine.eval()
        diffs = []
        with torch.no_grad():
            for _ in range(3):
                diffs.append(float((engine(input_ids=mine).logits - expected).abs().max()))
        local = torch.tensor(diffs)
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
        return {"max_abs_logit_diff_per_forward": local.tolist()}

    def attempt(fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # the measurement is the failure: record it
            return {"error": f"{type(error).__name__}: {error}", "raised_at": _where(error)}

    result: dict[str, Any] = {
        "versions": {
            "bitsandbytes": bnb.__version__,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "world_size": world,
        "replica": {"fp32": replica("fp32", "fp32"), "bf16": replica("bf16", "bf16")},
        "cases": {},
    }
    cases = result["cases"]
    cases["zero3 storage=fp32 precision=fp32"] = attempt(engine_case, "fp32", "fp32", 3)
    cases["zero3 storage=uint8 precision=fp32"] = attempt(engine_case, "uint8", "fp32", 3)
    cases["zero3 storage=bf16 precision=fp32"] = attempt(engine_case, "bf16", "fp32", 3)
    cases["zero3 storage=bf16 precision=bf16"] = attempt(engine_case, "bf16", "bf16", 3)
    cases["zero3 storage=uint8 precision=bf16"] = attempt(engine_case, "uint8", "bf16", 3)
    cases["zero2 storage=fp32 precision=fp32"] = attempt(engine_case, "fp32", "fp32", 2)
    cases["zero3+offload opt+param storage=fp32"] = attempt(engine_case, "fp32", "fp32", 3, offload=True)
    cases["zero3 fp32, left in eval mode, no repack guard"] = attempt(
        engine_case, "fp32", "fp32", 3, train_mode=False, guard=False
    )
    cases["zero3 fp32, left in eval mode, repack guard"] = attempt(engine_case, "fp32", "fp32", 3, train_mode=False)
    cases["frozen zero3 eval no_grad, no repack guard"] = attempt(frozen_case, False)
    cases["frozen zero3 eval no_grad, repack guard"] = attempt(frozen_case, True)
    # Failing cases last: each fails on every rank at the same point.
    cases["zero3 storage=fp32 precision=bf16 (storage != precision)"] = attempt(engine_case, "fp32", "bf16", 3)
    cases["zero2 storage=fp32 precision=bf16 (storage != precision)"] = attempt(engine_case, "fp32", "bf16", 2)
    cases["4-bit load inside deepspeed.zero.Init"] = attempt(
        lambda: {"loaded": str(type(load("fp32", "fp32", init=config(3, "fp32"))))}
    )
    if rank == 0:
        (work / "qlora.json").write_text(json.dumps(result, indent=1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_qlora(work: Path, steps: int) -> dict[str, Any] | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        print(f"== QLoRA: skipped: bitsandbytes cannot be imported ({error}).")
        print("   `pip install bitsandbytes` (0.50.2: a 43 MB wheel with CPU, CUDA, ROCm and XPU libraries,")
        print("   no other dependencies), or PYTHONPATH=<folder> after `pip install --target <folder> bitsandbytes`.")
        return None
    work.mkdir(parents=True, exist_ok=True)
    write_tiny_gpt2(work / "tiny")
    from dsgraph.runtime.env import worker_environment

    env = worker_environment(WORLD)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--nnodes", "1"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__]
    command += ["--qlora-worker", str(work), "--steps", str(steps)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (work / "qlora.json").is_file():
        print("== QLoRA: the 2-process job failed:\n" + (done.stdout + done.stderr)[-4000:])
        return None
    result: dict[str, Any] = json.loads((work / "qlora.json").read_text())
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def report_qlora(result: dict[str, Any]) -> None:
    print(f"== QLoRA on DeepSpeed ({result['world_size']} processes, CPU; {result['wall_s']} s)")
    print("  versions:", ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    for name, losses in result["replica"].items():
        print(f"  single-process replica, {name}: losses", ", ".join(f"{x:.9g}" for x in losses))
    for name, case in result["cases"].items():
        print(f"  -- {name}")
        if "error" in case:
            print(f"     FAILS: {case['error']}")
            print(f"     raised at {case['raised_at']}")
            continue
        if "losses" in case:
            ref = result["replica"]["bf16" if "precision=bf16" in name else "fp32"]
            worst = max(abs(a - b) for a, b in zip(case["losses"], ref, strict=True))
            print("     losses", ", ".join(f"{x:.9g}" for x in case["losses"]), f"(max |diff| to replica {worst:.3g})")
            lay = case["layout"]
            print(
                f"     Params4bit {lay['params4bit']}: {lay['quantized_weights']} weights in {lay['packed_bytes']} B;"
                f" quant state {lay['quant_state_bytes']} B (not a parameter: whole on every rank)"
            )
            m = case["measured"]
            print(
                f"     per rank: params {m['params']} B (ZeRO-3 rule: {lay['params_rule_per_rank']} B),"
                f" grads {m['grads']} B, optimizer states {m['optimizer_states']} B; trainable {case['trainable']}"
                f"; offload optimizer/param {case['offload']}"
            )
        else:
            print("    ", json.dumps(case))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["offload", "qlora", "all"], default="all")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--work", type=Path, default=None, help="keep the pipelines and runs here")
    parser.add_argument("--qlora-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.qlora_worker is not None:
        qlora_worker(args.qlora_worker, args.steps)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="dsgraph-offload-qlora-"))
    try:
        if args.part in ("offload", "all"):
            report_offload(run_offload(work / "offload", args.steps))
        if args.part in ("qlora", "all"):
            result = run_qlora(work / "qlora", min(args.steps, 3))
            if result is not None:
                report_qlora(result)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
