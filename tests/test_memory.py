"""The memory estimate (`dsgraph compile --memory`) against hand-counted parameters and against
what the runtime measures on each rank, and `zero = auto`."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dsgraph import cli
from dsgraph.compiler import compile_file
from dsgraph.dsconfig import estimate as memory
from dsgraph.dsconfig.sizes import human, parse_size
from dsgraph.render import to_text
from dsgraph.runtime.meta import count_plan
from replica import load_plan

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.10
W = 2


def mlp_sizes(inputs: int, hidden: list[int], outputs: int) -> list[int]:
    """Elements of each tensor of builtin.mlp: weight in*out, bias out, per Linear."""
    widths = [inputs, *hidden, outputs]
    return [n for a, b in itertools.pairwise(widths) for n in (a * b, b)]


def estimate_of(name: str, world: int = W) -> dict[str, memory.ModelEstimate]:
    result = compile_file(ROOT / "pipelines" / f"{name}.dsg", world)
    assert result.ok
    return {m.name: m for m in memory.estimate(result.plan, count_plan(result.plan), world).models}


def part(sizes: list[int], world: int = W) -> int:
    return sum(math.ceil(n / world) for n in sizes)


# -- the estimate, by hand -----------------------------------------------------------------------


def test_distill_frozen_zero3_teacher_and_zero2_adamw_student():
    est = estimate_of("distill")
    teacher, student = mlp_sizes(32, [128, 128], 8), mlp_sizes(32, [32], 8)
    t, s = est["teacher"], est["student"]
    assert (t.elements, t.trainable, s.elements, s.trainable) == (sum(teacher), 0, sum(student), sum(student))
    assert t.params == 4 * part(teacher)  # stage 3: each tensor split over W ranks
    assert t.grads == t.optimizer_states == 0  # frozen: nothing but parameters
    local = math.ceil(sum(student) / W)
    assert s.params == 4 * sum(student)  # stage 2: parameters whole
    assert s.grads == 4 * local  # ... gradients partitioned
    assert s.optimizer_states == 4 * local * 3  # fp32 master + exp_avg + exp_avg_sq


def test_disjoint_zero3_sgd_momentum():
    est = estimate_of("disjoint")
    wide, deep = mlp_sizes(16, [64], 4), mlp_sizes(16, [32, 32, 32], 4)
    assert est["wide"].elements == sum(wide) and est["deep"].elements == sum(deep)
    assert est["deep"].params == 4 * part(deep)
    assert est["deep"].grads == 4 * part(deep)
    assert est["deep"].optimizer_states == 4 * part(deep) * 2  # master + momentum


def test_shared_loss_and_stage3_divides_parameters_by_world_size():
    for world in (1, 2, 4):
        est = estimate_of("shared_loss", world)
        right, left = mlp_sizes(16, [24, 24], 4), mlp_sizes(16, [48], 4)
        assert est["right"].params == 4 * part(right, world)
        assert est["left"].params == 4 * sum(left)  # stage 2 does not split them
        assert est["left"].optimizer_states == 4 * math.ceil(sum(left) / world) * 3


def test_rules_for_precision_offload_and_stage0():
    counts = memory.Counts((1000, 24), (1000, 24))
    adam = {"optimizer": {"type": "AdamW"}}
    z0 = memory.estimate_model("m", "trained", 0, "fp32", adam, counts, 2)
    assert (z0.params, z0.grads, z0.optimizer_states) == (4096, 4096, 8192)  # no master in fp32 ZeRO-0
    bf = memory.estimate_model("m", "trained", 2, "bf16", adam, counts, 2)
    assert (bf.params, bf.grads, bf.optimizer_states) == (2048, 1024, 6144)
    off = memory.estimate_model(
        "m",
        "trained",
        3,
        "fp32",
        {**adam, "zero_optimization": {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}},
        counts,
        2,
    )
    assert off.total == 0 and off.host["params"] == 2048 and off.host["optimizer_states"] == 6144


def test_sizes_parse_and_print():
    assert parse_size("16GiB") == 16 * 1024**3
    assert parse_size("24e9") == 24 * 10**9
    assert parse_size("512 MB") == 512 * 10**6
    with pytest.raises(ValueError):
        parse_size("lots")
    assert human(1536) == "1.50 KiB"


def test_cli_memory_text_and_json(in_repo, capsys):
    assert (
        cli.main(["compile", "pipelines/distill.dsg", "--memory", "--world-size", "2", "--device-memory", "1GiB"]) == 0
    )
    text = capsys.readouterr().out
    assert "teacher" in text and "total per device" in text and "fits" in text
    assert cli.main(["compile", "pipelines/distill.dsg", "--memory", "--world-size", "2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world_size"] == 2 and data["total"] == sum(m["total"] for m in data["models"])


# -- zero = auto ---------------------------------------------------------------------------------

AUTO = ROOT / "tests" / "fixtures" / "zero_auto.dsg"


def test_zero_auto_small_device_gives_stage3_and_big_gives_stage0():
    small = compile_file(AUTO, 2, device_memory=parse_size("800KiB"))
    big = compile_file(AUTO, 2, device_memory=parse_size("16GiB"))
    assert small.ok and big.ok, [d.message for d in small.diagnostics + big.diagnostics]
    (s,), (b,) = small.plan.models, big.plan.models
    assert s.stage == 3 and s.zero_init and b.stage == 0
    assert s.zero_auto and b.zero_auto
    assert "zero = auto chose ZeRO-3: " in s.zero_auto and "800.00 KiB (--device-memory)" in s.zero_auto
    assert "ZeRO-2" in s.zero_auto  # the reason names what did not fit
    assert "zero = auto chose ZeRO-0" in b.zero_auto
    assert "zero = auto chose ZeRO-3" in to_text(small.plan)
    est = memory.estimate(small.plan, count_plan(small.plan), 2)
    assert est.total <= parse_size("800KiB")


def test_zero_auto_offloads_when_stage3_does_not_fit():
    result = compile_file(AUTO, 2, device_memory=parse_size("100KiB"))
    (m,) = result.plan.models
    assert m.stage == 3 and m.deepspeed_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.spawns
def test_a_file_without_zero_auto_imports_no_torch_when_compiled():
    script = (
        "import sys\nfrom dsgraph.cli import main\n"
        "assert main(['compile', 'pipelines/shared_loss.dsg', '--device-memory', '1GiB']) == 0\n"
        "assert 'torch' not in sys.modules\nprint('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("clean"), done.stderr


# -- against the runtime -------------------------------------------------------------------------


def assert_estimate_holds(run_dir: Path, world: int = W) -> None:
    """The estimate of a finished run's plan against what each of its ranks measured: within 10%
    for every model, every category and the total. tests/test_runtime.py holds every shipped
    pipeline's run to it, tests/test_lm.py the language-model pipelines', tests/test_gpu.py a run on
    CUDA."""
    plan = load_plan(run_dir)
    est = memory.estimate(plan, count_plan(plan), world)
    for rank in range(world):
        report = json.loads((run_dir / "ranks" / f"rank{rank}.json").read_text())
        # a model released after the precompute phase was measured just before its release
        measured = {**report["memory"], **{name: r["model"] for name, r in report.get("released", {}).items()}}
        assert set(measured) == {m.name for m in est.models}
        for model in est.models:
            got = measured[model.name]
            for category in ("params", "grads", "optimizer_states", "total"):
                want = model.total if category == "total" else getattr(model, category)
                assert abs(got[category] - want) <= TOLERANCE * max(want, 1), (
                    f"{plan.pipeline} rank {rank} {model.name} {category}: estimated {want}, measured {got[category]}"
                )
        total = sum(m["total"] for m in measured.values())
        assert abs(total - est.total) <= TOLERANCE * est.total


def test_zero_auto_deferred_for_user_code_names_the_model_that_stops_the_sizing(tmp_path):
    pipeline = tmp_path / "p.dsg"
    pipeline.write_text(
        "pipeline p {\n"
        "    steps = 2\n"
        "    micro_batch = 4\n"
        "    data d = builtin.synthetic_classification(samples=16, features=4, classes=2)\n"
        "    model a = builtin.mlp(inputs=4, outputs=2) { zero = auto  optimizer = sgd(lr=0.1) }\n"
        "    model b = never_imported:make(width=4) { zero = auto  optimizer = sgd(lr=0.1) }\n"
        "    loss l = ce(a(d.x), d.y) + ce(b(d.x), d.y)\n"
        "    train a, b on l\n"
        "}\n"
    )
    result = compile_file(pipeline, world_size=2)
    deferred = {d.span.line: d for d in result.diagnostics if d.code == "DSG418"}
    assert sorted(deferred) == [5, 6]
    assert "`b` is built by user code" in deferred[5].message and deferred[5].notes  # a waits for b
    assert "`b` is built by user code" in deferred[6].message and not deferred[6].notes  # b for itself
    assert "never_imported" not in sys.modules


def test_a_zero3_generation_gathered_once_counts_the_whole_model_while_it_runs(tmp_path):
    """`gather = once` holds the generator's whole weights on every rank while it generates: the
    estimate's generation phase adds the model less this rank's partition; `layers` adds nothing.
    `gather = auto` (the default) takes `once` when that fits the device, else `layers`."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "1+2="}\n')
    estimates = {}
    (tmp_path / "auto.dsg").write_text(GENERATING.replace("GATHER", ""))  # `gather = auto`, the default
    for device, chosen in (("16GiB", "once"), ("64KiB", "layers")):
        result = compile_file(tmp_path / "auto.dsg", W, device_memory=parse_size(device))
        assert result.plan is not None
        (gen,) = result.plan.generations
        assert gen.gather == chosen and gen.gather_reason is not None
        assert ("does not fit" in gen.gather_reason) == (chosen == "layers"), gen.gather_reason
    for gather in ("once", "layers"):
        path = tmp_path / f"{gather}.dsg"
        path.write_text(GENERATING.replace("GATHER", f"gather = {gather}"))
        result = compile_file(path, W)
        assert result.ok and result.plan is not None, result.diagnostics
        counts = count_plan(result.plan)
        estimates[gather] = (memory.estimate(result.plan, counts, W), counts["policy"].total)
    est, elements = estimates["once"]
    policy = est.models[0]
    assert est.gathered == {"policy": elements * 4 - policy.params}
    assert est.generation_total == est.training_total + elements * 4 - policy.params
    assert est.to_json()["phases"]["generation"] == est.generation_total
    assert "during generation" in est.to_text()
    layers, _ = estimates["layers"]
    assert layers.gathered == {} and layers.generation_total == layers.training_total


GENERATING = """pipeline g {
    steps = 2
    micro_batch = 2
    data prompts = builtin.prompts(path="prompts.jsonl", max_length=8)
    model policy = builtin.causal_lm(vocab=259, dim=32, layers=2, heads=2, max_len=32) {
        zero = { stage = 3 }
        optimizer = adamw(lr=1e-3)
    }
    generate rollouts = policy(prompts) { samples = 2  max_new_tokens = 4  GATHER }
    reward r = builtin.sums()
    loss objective = grpo(policy(rollouts.input_ids).logits, rollouts, r(rollouts), beta=0.0)
    train policy on objective
}
"""
