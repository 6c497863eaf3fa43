"""Compile speed: cold `dsgraph compile` wall time on the shipped pipelines (fresh processes),
and in-process compile time of generated pipelines with 10, 100 and 1000 models.

    .venv/bin/python benchmarks/compile_speed.py [--runs 7]

Targets (issue 2): cold CLI under 0.5 s; 1000 models under 1 s; growth no worse than linear."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generated_pipeline(models: int) -> str:
    """`models` models: pairs of a frozen ZeRO-3 teacher and a ZeRO-2 student, one loss and one
    train statement per pair, all reading one data set."""
    lines = [
        "pipeline generated {",
        "    steps = 10",
        "    micro_batch = 4",
        "    data train = builtin.synthetic_classification(samples=64, features=8, classes=4)",
        "    zero z3 { stage = 3 }",
        "    zero z2 { stage = 2 }",
    ]
    for i in range(models // 2):
        lines += [
            f"    model t{i} = builtin.mlp(inputs=8, hidden=[16], outputs=4) {{ zero = z3  frozen }}",
            f"    model s{i} = builtin.mlp(inputs=8, outputs=4) {{ zero = z2  optimizer = adamw(lr=1e-3) }}",
            f"    loss kd{i} = kl(s{i}(train.x), t{i}(train.x), temperature=2.0) + ce(s{i}(train.x), train.y)",
            f"    train s{i} on kd{i}",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def cold_cli(path: Path, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dsgraph", "compile", str(path)], cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(done.stderr.decode())
    return times


def in_process(text: str, runs: int) -> list[float]:
    from dsgraph.compiler import compile_source
    from dsgraph.render import to_text
    from dsgraph.source import SourceFile

    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = compile_source(SourceFile("generated.dsg", text))
        to_text(result.plan)
        times.append(time.perf_counter() - start)
        assert result.ok, result.diagnostics[:3]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    baseline = min((subprocess.run([sys.executable, "-c", "pass"]) and 0) or 0 for _ in range(1))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    bare = time.perf_counter() - start + baseline
    print(f"python start-up alone: {bare * 1000:.0f} ms")
    print("\ncold `dsgraph compile` (fresh process each run), median of", args.runs)
    for path in sorted((ROOT / "pipelines").glob("*.dsg")):
        times = cold_cli(path, args.runs)
        print(
            f"  {path.name:<18} median {statistics.median(times) * 1000:6.0f} ms   "
            f"min {min(times) * 1000:6.0f} ms   max {max(times) * 1000:6.0f} ms"
        )
    print("\ngenerated pipelines, compile + render in process (warm), median of", args.runs)
    previous = None
    for models in (10, 100, 1000):
        text = generated_pipeline(models)
        in_process(text, 1)  # warm the parser tables and imports
        median = statistics.median(in_process(text, args.runs))
        growth = f"   x{median / previous:5.1f} for x10 models" if previous else ""
        print(f"  {models:>5} models  median {median * 1000:7.1f} ms{growth}")
        previous = median
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "generated1000.dsg"
        big.write_text(generated_pipeline(1000))
        times = cold_cli(big, max(3, args.runs // 2))
        print(f"\ncold `dsgraph compile` of the 1000-model pipeline: median {statistics.median(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
