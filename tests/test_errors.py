"""The error corpus: tests/errors/*.dsg, one small program per case, each stating the exact set of
diagnostics it produces in comment lines at its top:

    # expect: DSG301 12:11                       a diagnostic in the case's own file
    # expect: DSG410 configs/bad.json:3:5        in another file, relative to tests/errors/

Every code of the registry has at least one case, and an entry in docs/diagnostics.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsgraph import cli
from dsgraph.codes import REGISTRY
from dsgraph.compiler import compile_file
from dsgraph.diagnostics import render_text

ROOT = Path(__file__).resolve().parent.parent
ERRORS = ROOT / "tests" / "errors"
CASES = sorted(ERRORS.glob("*.dsg"))
DOCS = ROOT / "docs" / "diagnostics.md"

_EXPECT = re.compile(r"#\s*expect:\s*(?P<code>DSG\d{3})\s+(?:(?P<file>\S+):)?(?P<line>\d+):(?P<col>\d+)\s*$")


def expectations(case: Path) -> set[tuple[str, str, int, int]]:
    """The (code, file, line, col) the case expects; `file` relative to tests/errors/."""
    found = set()
    for text in case.read_text(encoding="utf-8").splitlines():
        if not text.startswith("#"):
            continue
        match = _EXPECT.match(text)
        if match:
            found.add((match["code"], match["file"] or case.name, int(match["line"]), int(match["col"])))
        else:
            assert "expect" not in text, f"{case.name}: malformed expectation {text!r}"
    return found


def _relative(file: str) -> str:
    """A diagnostic's file (the path as dsgraph built it) relative to tests/errors/."""
    path = Path(file).resolve()
    try:
        return path.relative_to(ERRORS.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def actual(result) -> set[tuple[str, str, int, int]]:
    return {(d.code, _relative(d.span.file), d.span.line, d.span.col) for d in result.diagnostics}


def _show(result) -> str:
    return "\n".join(render_text(d, result.sources) for d in result.diagnostics) or "(no diagnostics)"


@pytest.fixture(scope="module")
def compiled():
    cache = {}

    def get(case: Path):
        if case not in cache:
            cache[case] = compile_file(case)
        return cache[case]

    return get


def test_the_corpus_is_there():
    assert len(CASES) >= len(REGISTRY)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_gives_exactly_the_expected_diagnostics(case, compiled):
    expected = expectations(case)
    assert expected, f"{case.name} states no `# expect:` line"
    assert {code for code, *_ in expected} <= set(REGISTRY), "an expected code is not in the registry"
    result = compiled(case)
    got = actual(result)
    assert got == expected, (
        f"\nmissing: {sorted(expected - got)}\nunexpected: {sorted(got - expected)}\n{_show(result)}"
    )
    if result.ok:
        assert result.plan is not None, "a file with only warnings still has a plan"
    else:
        assert result.plan is None


RUNTIME_CASES = {"DSG501", "DSG502"}  # found by `dsgraph run --resume`: test_manifest.py, test_reliability.py


def test_every_code_has_a_corpus_case():
    covered = {code for case in CASES for code, *_ in expectations(case)} | RUNTIME_CASES
    missing = sorted(set(REGISTRY) - covered)
    assert not missing, f"codes without a case in tests/errors/: {missing}"


def test_every_code_has_an_entry_in_docs():
    assert DOCS.is_file(), "docs/diagnostics.md does not exist"
    headings = {m.group(1) for m in re.finditer(r"^## (DSG\d{3})\b", DOCS.read_text(encoding="utf-8"), re.M)}
    missing = sorted(set(REGISTRY) - headings)
    assert not missing, f"codes without a `## DSGxxx` heading in docs/diagnostics.md: {missing}"


_CARETS = re.compile(r"^\s*\d*\s*\| *\^+\s*$", re.M)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rendered_diagnostics_show_the_source_and_a_help_line(case, compiled):
    result = compiled(case)
    for diag in result.diagnostics:
        text = render_text(diag, result.sources)
        first = text.splitlines()[0]
        assert f"[{diag.code}]: " in first and diag.severity.value in first, text
        assert _CARETS.search(text), f"no caret line under the source:\n{text}"
        assert re.search(r"^\s*= help: \S", text, re.M), f"no `= help:` line:\n{text}"
        assert diag.message.strip() and diag.help.strip()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cli_check_exit_status(case, compiled, capsys):
    has_error = any(d.is_error for d in compiled(case).diagnostics)
    status = cli.main(["check", str(case)])
    out, err = capsys.readouterr()
    assert status == (1 if has_error else 0), out + err
    assert "Traceback" not in out + err and "internal error" not in out + err
    assert ("error[" in out) == has_error

    status = cli.main(["check", str(case), "--format", "json"])
    out, err = capsys.readouterr()
    assert status == (1 if has_error else 0), out + err
    (report,) = json.loads(out)
    assert report["ok"] is not has_error
    assert {
        (d["code"], _relative(d["span"]["file"]), d["span"]["line"], d["span"]["col"]) for d in report["diagnostics"]
    } == expectations(case)


# A handful through a real process, from another working directory, with a relative path.
_SUBPROCESS_CASES = [
    "dsg101_double_equals.dsg",
    "dsg107_include_cycle.dsg",
    "dsg303_unused_model.dsg",
    "dsg410_trailing_comma.dsg",
    "dsg412_auto_without_optimizer.dsg",
]


def test_every_code_the_code_gives_is_in_the_registry_and_every_registered_code_is_given():
    """A code written anywhere in dsgraph/ (`"DSG307"`) is registered, so that it has a severity,
    a corpus case and a docs entry; and no registered code is dead."""
    used: dict[str, set[str]] = {}
    for path in sorted((ROOT / "dsgraph").rglob("*.py")):
        if path.name == "codes.py":  # the registry itself
            continue
        for code in re.findall(r"[\"'](DSG\d{3})[\"']", path.read_text(encoding="utf-8")):
            used.setdefault(code, set()).add(path.relative_to(ROOT).as_posix())
    assert {code: where for code, where in used.items() if code not in REGISTRY} == {}
    assert sorted(set(REGISTRY) - set(used)) == []


@pytest.mark.spawns
@pytest.mark.parametrize("name", _SUBPROCESS_CASES)
def test_cli_check_in_a_fresh_process(name):
    case = ERRORS / name
    has_error = any(d.is_error for d in compile_file(case).diagnostics)
    done = subprocess.run(
        [sys.executable, "-m", "dsgraph", "check", f"errors/{name}"],
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == (1 if has_error else 0), done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for code, file, line, col in expectations(case):
        shown = f"errors/{file}:{line}:{col}: "
        assert shown in done.stdout and f"[{code}]" in done.stdout, (shown, done.stdout)
