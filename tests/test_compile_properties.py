"""Compiling is deterministic, imports no torch/deepspeed/accelerate, and never raises on any
input: valid programs, byte mutations and token mutations of the shipped pipelines."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsgraph.compiler import compile_source
from dsgraph.source import SourceFile

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.name: p.read_text() for p in sorted((ROOT / "pipelines").glob("*.dsg"))}


# Every shipped pipeline's text plan, JSON plan and DOT picture, printed by one process.
_PRINT_ALL = """
import contextlib, io, sys
from dsgraph.cli import main
for name in sys.argv[1:]:
    for args in (["compile", "--format", "text"], ["compile", "--format", "json"], ["dot"]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main([args[0], "pipelines/" + name, *args[1:]])
        assert code == 0, (name, args, code)
        print(f"== {name} {args}")
        print(out.getvalue())
"""


@pytest.mark.spawns
def test_compile_twice_in_fresh_processes_is_byte_identical():
    """Two fresh processes with different string-hash seeds print every shipped pipeline's plans
    and picture byte for byte alike (no set or dict order leaks into the output)."""
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", _PRINT_ALL, *SHIPPED],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert outputs[0].count("digraph") == len(SHIPPED) and outputs[0].count('"dsgraph_plan"') == len(SHIPPED)


@pytest.mark.spawns
def test_compiling_imports_no_torch_deepspeed_accelerate_or_user_code(tmp_path):
    (tmp_path / "usercode_probe.py").write_text("raise SystemExit('user code was imported')\n")
    pipeline = tmp_path / "p.dsg"
    pipeline.write_text(
        SHIPPED["distill.dsg"]
        .replace("builtin.mlp(inputs=32, hidden=[32], outputs=8)", "usercode_probe:make(hidden=32)")
        .replace('file("configs/zero2.json")', "{ stage = 2 }")
    )
    script = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r})\n"
        "from dsgraph.cli import main\n"
        f"code = main(['compile', {str(pipeline)!r}])\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'accelerate', 'transformers', 'usercode_probe')"
        " if m in sys.modules)\n"
        "assert code == 0, code\n"
        "assert not heavy, heavy\n"
        "print('clean')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("clean")


def _compile_never_raises(text: str) -> None:
    result = compile_source(SourceFile("fuzz.dsg", text))
    for diag in result.diagnostics:
        assert diag.code.startswith("DSG") and diag.span.line >= 1 and diag.help
    assert result.plan is not None or any(d.is_error for d in result.diagnostics)


SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.sampled_from(sorted(SHIPPED)), st.data())
def test_byte_mutations_give_diagnostics_not_exceptions(name, data):
    text = SHIPPED[name]
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        action = data.draw(st.sampled_from(["delete", "insert", "replace"]))
        char = data.draw(st.sampled_from(list('{}()[]=,.:"#+-*/\n 0aZ_\\\x00é')))
        if action == "delete":
            text = text[:pos] + text[pos + 1 :]
        elif action == "insert":
            text = text[:pos] + char + text[pos:]
        else:
            text = text[:pos] + char + text[pos + 1 :]
    _compile_never_raises(text)


TOKENS = [
    "pipeline",
    "model",
    "data",
    "zero",
    "loss",
    "train",
    "on",
    "frozen",
    "include",
    "{",
    "}",
    "(",
    ")",
    "=",
    ",",
    "stage",
    "3",
    "-1",
    "0.5",
    '"x.json"',
    "student",
    "teacher",
    "train.x",
    "kl",
    "ce",
    "builtin.mlp",
    "pkg.mod:fn",
    "hf",
    "file",
    "auto",
    "true",
    "[",
    "]",
    "+",
    "*",
]


@SETTINGS
@given(st.sampled_from(sorted(SHIPPED)), st.data())
def test_token_mutations_give_diagnostics_not_exceptions(name, data):
    words = SHIPPED[name].split()
    for _ in range(data.draw(st.integers(1, 5))):
        pos = data.draw(st.integers(0, max(0, len(words) - 1)))
        action = data.draw(st.sampled_from(["delete", "insert", "replace", "swap"]))
        token = data.draw(st.sampled_from(TOKENS))
        if action == "delete" and words:
            del words[pos]
        elif action == "insert":
            words.insert(pos, token)
        elif action == "replace" and words:
            words[pos] = token
        elif action == "swap" and len(words) > 1:
            other = data.draw(st.integers(0, len(words) - 1))
            words[pos], words[other] = words[other], words[pos]
    _compile_never_raises(" ".join(words))


def test_grammar_generated_programs_compile_or_diagnose():
    from hypothesis.extra.lark import from_lark
    from lark import Lark

    from dsgraph.syntax.grammar import grammar_path

    grammar = Lark(grammar_path().read_text(), parser="lalr", start="start")

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        from_lark(
            grammar,
            explicit={
                "NAME": st.sampled_from(["a", "b", "x", "train", "stage", "teacher"]),
                "COMMENT": st.just("# c"),
                "WS": st.just(" "),
            },
        )
    )
    def run(text):
        _compile_never_raises(text)

    run()


def test_very_long_and_deeply_nested_input_is_a_diagnostic():
    deep = "pipeline p { loss l = " + "(" * 5000 + "1" + ")" * 5000 + " }"
    long_sum = "pipeline p { loss l = " + " + ".join(["1"] * 20000) + " }"
    for text in (deep, long_sum, "pipeline p {" + " seed = 1" * 200000 + "}"):
        result = compile_source(SourceFile("big.dsg", text))
        assert any(d.code in ("DSG105", "DSG208") for d in result.diagnostics)
