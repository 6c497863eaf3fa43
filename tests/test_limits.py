"""Hostile inputs to the compiler: files too large are refused before they are read, include chains
too deep and symlink loops are diagnostics, and no diagnostic echoes more than a bounded snippet."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from dsgraph.compiler import compile_file
from dsgraph.diagnostics import MAX_SNIPPET, render_text

PIPELINE = """pipeline p {{
    steps = 2
    micro_batch = 4
    {include}
    data train = builtin.synthetic_classification(samples=64, features=4, classes=2)
    model m = builtin.mlp(inputs=4, outputs=2) {{ zero = {zero}  optimizer = adamw(lr=1e-3) }}
    loss l = ce(m(train.x), train.y)
    train m on l
}}
"""


def _write(path: Path, include: str = "", zero: str = "{ stage = 2 }") -> Path:
    path.write_text(PIPELINE.format(include=include, zero=zero))
    return path


def _codes(result) -> list[tuple[str, int]]:
    return [(d.code, d.span.line) for d in result.diagnostics]


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as file:
        file.truncate(size)  # takes no disk space: the size is what a reader would see
    return path


def test_a_huge_include_is_refused_before_it_is_read(tmp_path):
    _sparse(tmp_path / "huge.dsg", 1 << 30)
    # `include` is a top-level statement: put it above the pipeline.
    (tmp_path / "p.dsg").write_text('include "huge.dsg"\n' + PIPELINE.format(include="", zero="{ stage = 2 }"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = compile_file(tmp_path / "p.dsg")
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB: nothing read
    assert _codes(result) == [("DSG105", 1)]
    assert "1,073,741,824 bytes" in result.diagnostics[0].message


def test_a_huge_deepspeed_json_is_refused_before_it_is_read(tmp_path):
    _sparse(tmp_path / "zero.json", 300 << 20)
    result = compile_file(_write(tmp_path / "p.dsg", include='zero big = file("zero.json")', zero="big"))
    assert [(d.code, d.span.line) for d in result.diagnostics if d.is_error] == [("DSG410", 4)]
    assert "314,572,800 bytes" in result.diagnostics[0].message


def test_a_huge_pipeline_file_is_refused_before_it_is_read(tmp_path):
    path = _sparse(tmp_path / "big.dsg", 5 << 20)
    result = compile_file(path)
    assert _codes(result) == [("DSG105", 1)] and result.plan is None


def test_a_symlink_loop_in_an_include_is_a_diagnostic(tmp_path):
    os.symlink("b.dsg", tmp_path / "a.dsg")
    os.symlink("a.dsg", tmp_path / "b.dsg")
    (tmp_path / "p.dsg").write_text('include "a.dsg"\n' + PIPELINE.format(include="", zero="{ stage = 2 }"))
    result = compile_file(tmp_path / "p.dsg")
    assert _codes(result) == [("DSG107", 1)]
    assert "cannot be resolved" in result.diagnostics[0].message


def test_an_include_chain_too_deep_is_a_diagnostic_not_a_crash(tmp_path):
    depth = 1500
    for i in range(depth):
        (tmp_path / f"z{i}.dsg").write_text(f'include "z{i + 1}.dsg"\n')
    (tmp_path / f"z{depth}.dsg").write_text("zero shared { stage = 2 }\n")
    (tmp_path / "p.dsg").write_text('include "z0.dsg"\n' + PIPELINE.format(include="", zero="shared"))
    start = time.perf_counter()
    result = compile_file(tmp_path / "p.dsg")
    assert time.perf_counter() - start < 10
    errors = [d for d in result.diagnostics if d.is_error]
    assert [(d.code, d.message) for d in errors] == [("DSG107", "includes nest deeper than 32 files")]


def test_a_diagnostic_shows_a_bounded_snippet_of_a_very_long_line(tmp_path):
    path = tmp_path / "long.dsg"
    path.write_text("pipeline p { steps = 2  micro_batch = 4 " + " " * 500_000 + "seed = x }\n")
    result = compile_file(path)
    (diag,) = [d for d in result.diagnostics if d.code == "DSG203"]
    text = render_text(diag, result.sources)
    assert max(len(line) for line in text.splitlines()) < MAX_SNIPPET + 40
    source_line, caret_line = text.splitlines()[2:4]
    caret = caret_line.index("^")
    assert source_line[caret] == "x"  # the caret is still under the mistake


def test_control_characters_of_a_file_are_drawn_not_sent_to_the_terminal(tmp_path):
    pipeline = tmp_path / "esc.dsg"
    pipeline.write_text("pipeline p { steps = 2 \x1b]0;retitled\x07\x1b[2J }\n")
    done = subprocess.run(
        [sys.executable, "-m", "dsgraph", "check", str(pipeline)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
    assert "\u241b]0;retitled\u2407" in done.stdout  # drawn as the control pictures, one column each
    line, carets = [x for x in done.stdout.splitlines() if x.startswith(("1 |", "  |  "))][:2]
    assert line.index("\u241b") == carets.index("^")


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    pipeline = tmp_path / "bom.dsg"
    pipeline.write_bytes(b"\xef\xbb\xbf" + (Path(__file__).parent / "fixtures" / "resume.dsg").read_bytes())
    result = compile_file(pipeline, world_size=2)
    assert result.ok, [d.message for d in result.diagnostics]
