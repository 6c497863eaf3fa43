"""A checkpoint is checked against the plan before anything of it is loaded. From the checkpoints
of one real 2-process run, each corruption of the newest one (no models, the wrong shape, a path
outside the run directory, a truncated or altered file) makes resume fall back to the previous
checkpoint with a warning naming the file and why; none left is DSG502; a plan that differs
(seed, batch geometry, the content of a data file, `steps` below the checkpoint) is DSG501 with a
caret at the line that changed. One real resume proves the fallback is exact and that nothing
outside the run directory is unpickled, with garbage and a torn line at the end of metrics.jsonl."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from dsgraph import resume
from dsgraph.compiler import compile_file
from dsgraph.diagnostics import Diagnostic
from test_reliability import FIXTURES, _evil_pickle, losses, run

pytestmark = pytest.mark.runtime
NEWEST, OLDER = "step-00000016", "step-00000008"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A run of resume.dsg (16 steps, checkpoints at steps 8 and 16), never to be changed."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    done = run(FIXTURES / "resume.dsg", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "ckpt" / "manifests").iterdir()) == [f"{OLDER}.json", f"{NEWEST}.json"]
    return run_dir


@pytest.fixture
def run_dir(saved: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(saved, copy, symlinks=True)
    return copy


def check(run_dir: Path, pipeline: Path = FIXTURES / "resume.dsg", *overrides: str) -> tuple[Path | None, list]:
    result = compile_file(pipeline, world_size=2, overrides=overrides)
    assert result.ok and result.plan is not None, [d.message for d in result.diagnostics]
    return resume.check(run_dir, result.plan, 2, result)


def manifest_path(run_dir: Path, tag: str = NEWEST) -> Path:
    return run_dir / "ckpt" / "manifests" / f"{tag}.json"


def edit_manifest(run_dir: Path, change: Any, digest: bool = True) -> None:
    """Change the newest manifest; with `digest`, give it the digest of its new content (as a
    deliberate forger would), so that the checks behind the digest are what refuses it."""
    path = manifest_path(run_dir)
    document = json.loads(path.read_text())
    document = change(document) or document
    if digest and isinstance(document, dict):
        body = {k: v for k, v in document.items() if k not in ("dsgraph_checkpoint", "digest")}
        document["digest"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    path.write_text(json.dumps(document))


def falls_back(run_dir: Path, capsys, *why: str) -> None:
    """resume takes the older checkpoint and warns, naming the newer one and why."""
    chosen, diags = check(run_dir)
    assert diags == [] and chosen == manifest_path(run_dir, OLDER)
    warning = capsys.readouterr().err
    assert f"skipping the checkpoint {manifest_path(run_dir)}" in warning
    assert all(word in warning for word in why), warning


def shard(run_dir: Path, model: str = "left") -> Path:
    return next((run_dir / "ckpt" / model / NEWEST).glob("*model_states.pt"))


# -- each corruption of the newest checkpoint: the older one is used ---------------------------


def test_an_intact_run_resumes_from_its_newest_checkpoint(run_dir):
    assert check(run_dir) == (manifest_path(run_dir), [])


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["ranks"].reverse(),  # each rank would continue with the other's generators
        lambda d: d["ranks"][0]["data"]["a"].update(position=d["ranks"][0]["data"]["a"]["position"] + 1),
        lambda d: d["identity"].update(seed=12),
    ],
    ids=["ranks-swapped", "position-moved", "seed-changed"],
)
def test_a_manifest_edited_after_it_was_saved_is_skipped(run_dir, capsys, change):
    edit_manifest(run_dir, change, digest=False)
    falls_back(run_dir, capsys, "it was changed after it was saved (its digest does not match its content)")


def test_a_manifest_that_is_a_fifo_a_link_or_a_folder_is_skipped(run_dir, capsys):
    path = manifest_path(run_dir)
    path.unlink()
    os.mkfifo(path)  # opening it would wait for a writer forever
    falls_back(run_dir, capsys, "it is not a plain file")
    path.unlink()
    path.symlink_to("/dev/zero")
    falls_back(run_dir, capsys, "it is not a plain file")
    path.unlink()
    path.mkdir()
    falls_back(run_dir, capsys, "it is not a plain file")


def test_a_manifest_nested_too_deep_to_read_is_skipped(run_dir, capsys):
    manifest_path(run_dir).write_text("[" * 100_000 + "]" * 100_000)
    falls_back(run_dir, capsys, "it cannot be read")


def test_a_manifest_that_lists_no_models_is_skipped(run_dir, capsys):
    edit_manifest(run_dir, lambda d: d.update(models=[]))
    falls_back(run_dir, capsys, "lists the models none, but its plan trains ['left', 'right']")


def test_a_manifest_that_lists_one_model_of_two_is_skipped(run_dir, capsys):
    edit_manifest(run_dir, lambda d: d.update(models=d["models"][:1]))
    falls_back(run_dir, capsys, "lists the models ['left']")


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(models="left"),
        lambda d: d.pop("ranks"),
        lambda d: d.update(step="16"),
        lambda d: d["models"][0]["files"][0].update(size=None),
        lambda d: d.update(identity=[]),
        lambda d: d.update(dsgraph_checkpoint=1),
        lambda d: [1, 2, 3],
        lambda d: d["ranks"].pop(),
        lambda d: d["ranks"][0]["rng"].update(torch="not base64!"),
        lambda d: d["ranks"][1]["rng"].update(python="[3, [1, 2], null"),
        lambda d: d["ranks"][1]["data"]["a"].update(position=-3),
        lambda d: d["ranks"][0]["data"].pop("b"),
        lambda d: d["identity"]["models"].update(left={"role": "trained"}),
        lambda d: d["identity"].update(losses=[["x"]]),
        lambda d: d["identity"]["data"].update(a="x"),
    ],
    ids=[
        "models-a-string",
        "no-ranks",
        "step-a-string",
        "size-null",
        "identity-a-list",
        "version-1",
        "a-list",
        "one-rank-of-two",
        "torch-rng-not-base64",
        "python-rng-not-json",
        "negative-position",
        "data-set-missing",
        "model-identity-partial",
        "losses-a-list",
        "data-identity-a-string",
    ],
)
def test_a_manifest_of_the_wrong_shape_is_skipped(run_dir, capsys, change):
    edit_manifest(run_dir, change)
    falls_back(run_dir, capsys)


def test_a_manifest_that_is_not_json_is_skipped(run_dir, capsys):
    manifest_path(run_dir).write_text('{"dsgraph_checkpoint": 2, "step": 1')
    falls_back(run_dir, capsys, "cannot be read")


def test_a_model_folder_outside_the_run_directory_is_skipped(run_dir, capsys):
    edit_manifest(run_dir, lambda d: d["models"][0].update(folder=f"../elsewhere/left/{NEWEST}"))
    falls_back(run_dir, capsys, "puts `left` in '../elsewhere/left/step-00000016'")


def test_a_model_folder_that_is_a_link_out_of_the_run_directory_is_skipped(run_dir, tmp_path, capsys):
    folder = run_dir / "ckpt" / "left" / NEWEST
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    falls_back(run_dir, capsys, "not a folder of the run directory")


def test_a_truncated_file_is_skipped_and_named(run_dir, capsys):
    path = shard(run_dir)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    falls_back(run_dir, capsys, str(path), f"{size // 2:,} bytes, {size:,} when it was saved")


def test_a_file_changed_in_place_is_skipped_and_named(run_dir, capsys):
    path = shard(run_dir, "right")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    falls_back(run_dir, capsys, str(path), "SHA-256 differs")


def test_a_file_not_recorded_in_the_manifest_is_skipped(run_dir, capsys):
    (run_dir / "ckpt" / "left" / NEWEST / "extra.pt").write_bytes(b"not saved by dsgraph")
    falls_back(run_dir, capsys, "not recorded ['extra.pt']")


def test_no_valid_checkpoint_left_is_dsg502_with_every_reason(run_dir):
    os.truncate(shard(run_dir), 10)
    manifest_path(run_dir, OLDER).write_text("[]")
    chosen, diags = check(run_dir)
    assert chosen is None and [d.code for d in diags] == ["DSG502"]
    assert f"{NEWEST}.json" in diags[0].message and f"{OLDER}.json" in diags[0].message


# -- a different plan: DSG501 at the line that changed -----------------------------------------


def only_dsg501(diags: list[Diagnostic]) -> Diagnostic:
    assert [d.code for d in diags] == ["DSG501"], [d.message for d in diags]
    return diags[0]


def line_of(pipeline: Path, text: str) -> int:
    return next(n for n, line in enumerate(pipeline.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("seed", "12", "seed was 11, is now 12"),
        ("micro_batch", "2", "micro_batch was 4, is now 2"),
        ("steps", "4", "past `steps = 4`"),
    ],
)
def test_a_changed_setting_points_at_its_line(run_dir, tmp_path, setting, value, message):
    pipeline = tmp_path / "resume.dsg"
    lines = (FIXTURES / "resume.dsg").read_text().splitlines()
    changed = [f"    {setting} = {value}" if line.startswith(f"    {setting} = ") else line for line in lines]
    assert changed != lines, f"resume.dsg sets no {setting}"
    pipeline.write_text("\n".join(changed) + "\n")
    chosen, diags = check(run_dir, pipeline)
    diag = only_dsg501(diags)
    assert chosen is None and message in diag.message
    assert diag.span.line == line_of(pipeline, f"{setting} = {value}")


@pytest.mark.parametrize(
    ("old", "new", "line_text", "message"),
    [
        ("adamw(lr=1e-2)", "adamw(lr=2e-2)", "optimizer = adamw", "`left` changed: deepspeed_config (optimizer"),
        ("momentum=0.9", "momentum=0.8", "optimizer = sgd", "`right` changed: deepspeed_config (optimizer"),
        ("stage = 3  stage3", "stage = 2  stage3", "stage = 2  stage3", "`right` changed: deepspeed_config (zero"),
        ("inputs=8, hidden=[16], outputs=3, dropout=0.2) {\n        zero = { stage = 2 }",
         "inputs=8, hidden=[32], outputs=3, dropout=0.2) {\n        zero = { stage = 2 }",
         "model left", "`left` changed: source"),
    ],
    ids=["optimizer", "momentum", "zero-stage", "model-source"],
)  # fmt: skip
def test_a_changed_model_property_points_at_its_line(run_dir, tmp_path, old, new, line_text, message):
    text = (FIXTURES / "resume.dsg").read_text()
    assert text.count(old) == 1
    pipeline = tmp_path / "resume.dsg"
    pipeline.write_text(text.replace(old, new))
    chosen, diags = check(run_dir, pipeline)
    diag = only_dsg501(diags)
    assert chosen is None and message in diag.message
    assert diag.span.line == line_of(pipeline, line_text)


def test_a_model_property_given_by_set_points_at_the_option(run_dir):
    chosen, diags = check(run_dir, FIXTURES / "resume.dsg", "steps=16", "left.optimizer.lr=0.5")
    diag = only_dsg501(diags)
    assert chosen is None and diag.span.file == "--set[2]"


def test_grad_accum_added_by_set_points_at_the_option(run_dir):
    chosen, diags = check(run_dir, FIXTURES / "resume.dsg", "grad_accum=2")
    diag = only_dsg501(diags)
    assert chosen is None and "grad_accum was 1, is now 2" in diag.message
    assert diag.span.file == "--set[1]"


JSONL_PIPELINE = """\
pipeline table {
    seed = 3
    steps = 2
    micro_batch = 2
    checkpoint_every = 2
    data rows = builtin.jsonl(path="rows.jsonl")
    model net = builtin.mlp(inputs=2, hidden=[4], outputs=2) {
        zero = { stage = 2 }
        optimizer = sgd(lr=0.1)
    }
    loss fit = ce(net(rows.x), rows.y)
    train net on fit
}
"""


def test_a_data_file_whose_content_changed_is_dsg501_at_the_data_line(tmp_path):
    pipeline = tmp_path / "table.dsg"
    pipeline.write_text(JSONL_PIPELINE)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"x": [i / 8, 1 - i / 8], "y": i % 2}) + "\n" for i in range(8)))
    run_dir = tmp_path / "run"
    done = run(pipeline, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert check(run_dir, pipeline) == (run_dir / "ckpt" / "manifests" / "step-00000002.json", [])
    rows.write_text(rows.read_text().replace('"y": 1', '"y": 0'))  # same path, other labels
    chosen, diags = check(run_dir, pipeline)
    diag = only_dsg501(diags)
    assert chosen is None and "the file of data set `rows` changed" in diag.message
    assert diag.span.line == line_of(pipeline, "data rows")


# -- a real resume past a corrupted checkpoint -------------------------------------------------


def test_resume_past_a_checkpoint_linked_outside_is_exact_and_unpickles_nothing_there(saved, run_dir, tmp_path):
    # The newest checkpoint of `left` now lies outside the run directory, and its files there
    # would run code if unpickled; and a crash tore the last line of metrics.jsonl.
    marker = tmp_path / "unpickled"
    folder = run_dir / "ckpt" / "left" / NEWEST
    outside = tmp_path / "outside"
    shutil.move(folder, outside)
    for name in os.listdir(outside):
        (outside / name).write_bytes(_evil_pickle(marker))
    folder.symlink_to(outside, target_is_directory=True)
    planted = sorted(os.listdir(outside))
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write("[" * 100_000 + "\n")  # garbage that no JSON reader can take
        metrics.write('{"losses": {"fit_left": 0.4')

    resumed = run(FIXTURES / "resume.dsg", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {OLDER}.json" in resumed.stderr
    assert f"skipping the checkpoint {manifest_path(run_dir)}" in resumed.stderr
    assert resumed.stderr.count("not a whole record (torn by a crash?); dropped") == 2
    assert not marker.exists() and sorted(os.listdir(outside)) == planted  # never read, never removed
    assert not folder.is_symlink()  # step 16 saved again, inside the run directory
    straight, again = losses(saved), losses(run_dir)
    assert sorted(again) == list(range(1, 17))
    assert all(straight[step] == again[step] for step in range(1, 17))  # bit-identical, not close
