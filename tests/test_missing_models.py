"""DSG214: an `hf(...)` directory missing on this machine. `check` and `compile` warn, naming the
command that writes it when a comment line of the .dsg file says so; `run` and `compile --memory`
stop before anything starts. In-process and fast: nothing is built or launched."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from dsgraph import cli
from dsgraph.compiler import compile_file
from dsgraph.lower.sources import maker
from dsgraph.source import SourceFile

ROOT = Path(__file__).resolve().parent.parent
# The language-model pipelines, the command each one's header names, and the directories it loads.
SHIPPED = {
    "distill_lm.dsg": ("python pipelines/make_tiny_models.py --teach 300", ["tiny/teacher", "tiny/student"]),
    "dpo.dsg": ("python pipelines/make_tiny_models.py", ["tiny/policy", "tiny/policy"]),
    "lora_distill.dsg": ("python pipelines/make_tiny_models.py --teach 300", ["tiny/teacher", "tiny/policy"]),
}


@pytest.fixture
def fresh(tmp_path) -> Path:
    """pipelines/ as a fresh clone has it: the .dsg files, no tiny/."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    for name in SHIPPED:
        shutil.copy(ROOT / "pipelines" / name, folder / name)
    return folder


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_a_shipped_lm_pipeline_without_tiny_names_the_command_that_writes_it(fresh, name):
    command, directories = SHIPPED[name]
    result = compile_file(fresh / name)
    assert result.ok and result.plan is not None, "a warning: the plan is still built"
    found = [d for d in result.diagnostics if d.code == "DSG214"]
    assert [d.message for d in found] == [
        f"hf model directory `{rel}` does not exist (looked for {fresh / rel})" for rel in directories
    ]
    source = result.sources[str(fresh / name)]
    for diag in found:
        assert f"write it with `{command}`" in diag.help
        shown = source.line_text(diag.span.line)[diag.span.col - 1 : diag.span.end_col - 1]
        assert shown == f'"{diag.message.split("`")[1]}"', "the caret is under the hf(...) argument"
        (note,) = diag.notes
        assert note.span is not None and source.line_text(note.span.line).lstrip("# ").startswith(command)
    # The command is one the repository can run, and its script writes tiny/ beside the pipelines.
    script = ROOT / command.split()[1]
    assert script.is_file() and '"tiny"' in script.read_text()


def test_with_tiny_written_there_is_no_warning(fresh):
    for sub in ("teacher", "student", "policy"):
        (fresh / "tiny" / sub).mkdir(parents=True)
    for name in SHIPPED:
        assert compile_file(fresh / name).diagnostics == []


def test_run_does_not_start_without_the_model_directories(fresh, tmp_path, capsys, monkeypatch):
    from dsgraph.runtime import launch

    def no_launch(*args, **kwargs):
        raise AssertionError("a worker was launched")

    monkeypatch.setattr(launch, "launch", no_launch)
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(fresh / "distill_lm.dsg"), "--procs", "2", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "warning[DSG214]" in err and "write it with `python pipelines/make_tiny_models.py --teach 300`" in err
    assert err.rstrip().endswith(
        "dsgraph: not started: the 2 hf(...) paths above do not exist on this machine (DSG214)"
    )
    assert not run_dir.exists(), "nothing is created"


def test_check_and_compile_only_warn_and_compile_memory_stops(fresh, capsys):
    path = str(fresh / "dpo.dsg")
    assert cli.main(["check", path]) == 0
    assert "warning[DSG214]" in capsys.readouterr().out
    assert cli.main(["compile", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("plan dpo") and "warning[DSG214]" in err
    assert cli.main(["compile", path, "--memory", "--world-size", "2"]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith(
        "dsgraph: no memory estimate: the hf(...) path above does not exist on this machine (DSG214)"
    )


def test_a_file_where_the_directory_should_be_and_a_missing_config_file(tmp_path):
    (tmp_path / "lm").write_text("not a model")
    pipe = tmp_path / "pipe.dsg"
    pipe.write_text(
        "pipeline p {\n"
        "    steps = 10\n"
        "    micro_batch = 8\n"
        "    data train = builtin.synthetic_tokens(samples=64, length=8, vocab=64)\n"
        '    model lm = hf("lm") { optimizer = adamw(lr=1e-3) }\n'
        '    model ref = hf(config="ref.json") { frozen }\n'
        "    loss fit = kl(lm(train.input_ids).logits, ref(train.input_ids).logits)\n"
        "    train lm on fit\n"
        "}\n"
    )
    found = {d.message: d for d in compile_file(pipe).diagnostics}
    assert set(found) == {
        f"hf model directory `lm` is not a directory (looked for {tmp_path / 'lm'})",
        f"hf config file `ref.json` does not exist (looked for {tmp_path / 'ref.json'})",
    }
    assert all(not d.notes and "nothing is downloaded" in d.help for d in found.values())
    (tmp_path / "ref.json").write_text("{}")
    assert len(compile_file(pipe).diagnostics) == 1


def _maker(text: str, rel: str):
    return maker(SourceFile("p.dsg", text), rel)


def test_the_comment_line_that_says_how_a_directory_is_made():
    line = "#   python mk.py --teach 300      writes tiny/ (or point hf() at yours)\n"
    command, span = _maker("# header\n#\n" + line, "tiny/teacher")
    assert command == "python mk.py --teach 300"
    assert (span.line, span.col, span.end_col) == (3, 5, 5 + len(command))
    assert _maker(line, "./tiny/teacher/")[0] == command  # the same path, written differently
    assert _maker(line, "tiny")[0] == command
    for other in ("tinyx/teacher", "models/tiny", "/tiny/teacher", "teacher"):
        assert _maker(line, other) is None, other
    # `writes` after two or more spaces, in a whole-line comment, and PATH above or at the directory.
    assert _maker("# the script writes tiny/\n", "tiny/a") is None
    assert _maker('model m = hf("tiny/a")   # mk.py   writes tiny/\n', "tiny/a") is None
    assert _maker("#   mk.py   writes tiny/a\n", "tiny") is None
    assert _maker("#   ./rewrites.sh\twrites  /models/\n", "/models/lm")[0] == "./rewrites.sh"
    assert _maker("#   first   writes a/\n#   second   writes b/\n", "b/x")[0] == "second"


def test_finding_the_comment_stays_linear_on_hostile_lines():
    text = ("#" + " " * 200_000 + "writes" + "\n") * 5 + ("# x" + "  writes y" * 20_000 + "\n") * 5
    text += ("#" + " writes" * 100_000 + " \n") * 5
    started = time.perf_counter()
    assert _maker(text, "z/a") is None
    assert time.perf_counter() - started < 2.0
