"""The command line: `dsgraph compile | check | dot | run`.

Exit codes: 0 ok, 1 user error (diagnostics), 2 usage, 4 a worker failed or hung, 70 internal
error (traceback only with --debug), 74 the environment (the run directory, a full disk, a
read-only file system, a run directory in use), 130 interrupted."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from dsgraph.compiler import Compilation
    from dsgraph.diagnostics import Diagnostic
    from dsgraph.plan import Plan
    from dsgraph.source import Span

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_WORKER, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 4, 70, 130
EXIT_ENVIRONMENT = 74  # the machine's fault: the run directory, a full disk, a read-only file system

EPILOG = """examples:
  dsgraph compile pipelines/distill.dsg               the plan, as text
  dsgraph compile pipelines/distill.dsg --format json --world-size 2
  dsgraph compile pipelines/distill.dsg --emit graph  an earlier stage: ast, ir, graph or hoist
  dsgraph compile pipelines/distill.dsg --set teacher.cache=true   the teacher hoisted out of the loop
  dsgraph compile pipelines/distill.dsg --memory --world-size 2   bytes per model and rank
  dsgraph check pipelines/*.dsg                       diagnostics only
  dsgraph dot pipelines/distill.dsg -o distill.svg    the graph, drawn by Graphviz
"""


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (steps=40) or a model property (student.optimizer.lr=1e-4, teacher.cache=true)",
    )


def _trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-user-code",
        action="store_true",
        help="let `zero = auto` build factory models on the meta device to size them (runs their code)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsgraph",
        description="Declare, check and run several models together under DeepSpeed ZeRO.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compile", help="check a .dsg file and print its plan")
    p.add_argument("file")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--emit",
        choices=("ast", "ir", "graph", "hoist", "plan"),
        default="plan",
        help="print this stage instead of the plan",
    )
    p.add_argument(
        "--world-size", type=_positive, default=None, help="plan for this many processes (resolves train_batch_size)"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="print the memory estimate per model and rank (builds the models on the meta device)",
    )
    p.add_argument(
        "--device-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="memory of one device, e.g. 16GiB or 24e9: what `zero = auto` and --memory plan for",
    )
    _set_option(p)
    _trust_option(p)

    p = sub.add_parser("check", help="report the diagnostics of .dsg files")
    p.add_argument("files", nargs="+")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--world-size", type=_positive, default=None)
    _trust_option(p)

    p = sub.add_parser("run", help="compile, then train on DeepSpeed engines with N processes")
    p.add_argument("file")
    p.add_argument(
        "--procs", type=_positive, default=None, help="processes to start (default: one per GPU, or 2 without a GPU)"
    )
    p.add_argument("--run-dir", default=None, help="default: runs/<pipeline>-<time>")
    _set_option(p)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default=None,
        help="continue the run in RUN_DIR from its newest complete checkpoint",
    )
    p.add_argument(
        "--device-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="memory of one device, e.g. 16GiB: what `zero = auto` plans for (default: the device's)",
    )
    p.add_argument(
        "--hang-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="stop the run when a rank makes no progress for this long (default 600)",
    )

    p = sub.add_parser("dot", help="draw the pipeline graph (DOT, or SVG/PNG through Graphviz)")
    p.add_argument("file")
    p.add_argument("-o", "--output", help="out.dot, out.svg or out.png (default: DOT on stdout)")
    p.add_argument("--world-size", type=_positive, default=None)
    _trust_option(p)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _size(text: str) -> int:
    from dsgraph.dsconfig.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        handler = {"compile": cmd_compile, "check": cmd_check, "dot": cmd_dot, "run": cmd_run}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as error:
        from dsgraph.runtime.rundir import describe, is_environment_error

        if isinstance(error, OSError) and is_environment_error(error) and not args.debug:
            print(f"dsgraph: {describe(error)}", file=sys.stderr)  # the machine's, not a bug of dsgraph
            return EXIT_ENVIRONMENT
        if args.debug:
            traceback.print_exc()
        else:
            kind = type(sys.exc_info()[1]).__name__
            print(
                f"dsgraph: internal error ({kind}); run again with --debug for the traceback, and please report it",
                file=sys.stderr,
            )
        return EXIT_INTERNAL


def _load(
    path: str,
    world_size: int | None,
    overrides: tuple[str, ...] = (),
    device_memory: int | None = None,
    trust_user_code: bool = False,
) -> Compilation | None:
    from dsgraph.compiler import compile_file

    if not Path(path).is_file():
        what = "not a plain file" if os.path.lexists(path) else "no such file"
        print(f"dsgraph: {what}: {path}", file=sys.stderr)
        return None
    return compile_file(path, world_size, overrides, device_memory, trust_user_code)


def _print_diagnostics(result: Compilation, stream: TextIO | None = None) -> None:
    from dsgraph.diagnostics import render_summary, render_text

    stream = stream or sys.stderr  # looked up now: a test (or a caller) may have replaced it
    for diag in result.diagnostics:
        print(render_text(diag, result.sources), file=stream)
    if result.diagnostics or not result.ok:
        print(render_summary(result.diagnostics, result.source.name), file=stream)


def cmd_compile(args: argparse.Namespace) -> int:
    result = _load(args.file, args.world_size, tuple(args.overrides), args.device_memory, args.trust_user_code)
    if result is None:
        return EXIT_USAGE
    if args.emit == "ast" and result.ast is not None:
        from dsgraph.syntax.ast import dump

        sys.stdout.write(dump(result.ast))
        return EXIT_OK
    if args.format == "json" and not result.ok:
        print(json.dumps({"ok": False, "diagnostics": [d.to_json() for d in result.diagnostics]}, indent=2))
        return EXIT_USER
    _print_diagnostics(result)
    if not result.ok:
        return EXIT_USER
    plan, pipeline, graph = result.plan, result.ir, result.graph
    assert plan is not None and pipeline is not None and graph is not None  # no error: every stage ran
    if args.memory:
        return EXIT_USER if _missing_models(result, "no memory estimate") else _print_memory(plan, args)
    if args.emit == "ir":
        sys.stdout.write(pipeline.show())
    elif args.emit == "graph":
        from dsgraph.graph import show

        sys.stdout.write(show(graph))
    elif args.emit == "hoist":
        assert result.hoisting is not None
        sys.stdout.write(result.hoisting.show(graph))
    elif args.format == "json":
        sys.stdout.write(plan.to_json())
    else:
        from dsgraph.render import to_text

        sys.stdout.write(to_text(plan))
    return EXIT_OK


def _missing_models(result: Compilation, refused: str) -> bool:
    """DSG214 is a warning, since a plan does not depend on the machine; but what builds the
    models (`run`, `compile --memory`) stops before it starts, saying why in one line."""
    missing = len({d.message for d in result.diagnostics if d.code == "DSG214"})
    if missing:
        what = "the hf(...) path above does" if missing == 1 else f"the {missing} hf(...) paths above do"
        print(f"dsgraph: {refused}: {what} not exist on this machine (DSG214)", file=sys.stderr)
    return bool(missing)


def _missing_packages(result: Compilation) -> bool:
    """A tracker or a `quantize` whose package is not installed stops `run` before anything
    starts: one line each, at the line that asks for it, with the install command. Nothing is
    imported to find out."""
    import importlib.util

    from dsgraph.runtime.trackers import missing_packages

    pipeline = result.ir
    if pipeline is None:
        return False
    missing: list[tuple[Span, str, str]] = []  # where, what needs it, the pip package
    for name, package in missing_packages(pipeline.settings.track):
        missing.append((pipeline.settings.spans.get("track", pipeline.span), f"tracker `{name}`", package))
    quantized = [m for m in pipeline.models.values() if m.quantize]
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        names = ", ".join(f"`{m.name}`" for m in quantized)
        span = quantized[0].spans.get("quantize", quantized[0].span)
        missing.append((span, f"`quantize` ({names})", "bitsandbytes"))
    for span, what, package in missing:
        print(
            f"{span.file}:{span.line}:{span.col}: error: {what} needs the package {package}: pip install {package}",
            file=sys.stderr,
        )
    return bool(missing)


def _print_memory(plan: Plan, args: argparse.Namespace) -> int:
    """`compile --memory`: the estimate per model and rank (torch is imported here only)."""
    from dsgraph.dsconfig.estimate import attach_budget, estimate
    from dsgraph.runtime.meta import budget, count_plan

    try:
        counts = count_plan(plan)
    except Exception as error:
        print(f"dsgraph: cannot build the models on the meta device: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_USER
    est = estimate(plan, counts, args.world_size)
    if args.device_memory is not None:
        attach_budget(est, budget(args.device_memory, est.world_size))
    sys.stdout.write(json.dumps(est.to_json(), indent=2) + "\n" if args.format == "json" else est.to_text())
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    status, report = EXIT_OK, []
    for path in args.files:
        result = _load(path, args.world_size, trust_user_code=args.trust_user_code)
        if result is None:
            status = max(status, EXIT_USAGE)
            continue
        if args.format == "json":
            report.append({"file": path, "ok": result.ok, "diagnostics": [d.to_json() for d in result.diagnostics]})
        else:
            _print_diagnostics(result, sys.stdout)
            if not result.diagnostics:
                print(f"{path}: ok")
        if not result.ok:
            status = max(status, EXIT_USER)
    if args.format == "json":
        print(json.dumps(report, indent=2))
    return status


def cmd_dot(args: argparse.Namespace) -> int:
    result = _load(args.file, args.world_size, trust_user_code=args.trust_user_code)
    if result is None:
        return EXIT_USAGE
    _print_diagnostics(result)
    if not result.ok:
        return EXIT_USER
    from dsgraph.dot import to_dot

    assert result.graph is not None and result.plan is not None  # no error: every stage ran
    text = to_dot(result.graph, result.plan)
    if not args.output:
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt in ("dot", "gv", ""):
        out.write_text(text, encoding="utf-8")
        return EXIT_OK
    if fmt not in ("svg", "png", "pdf"):
        print(f"dsgraph: cannot write .{fmt}; use .dot, .svg, .png or .pdf", file=sys.stderr)
        return EXIT_USAGE
    dot = shutil.which("dot")
    if dot is None:
        print(
            "dsgraph: drawing SVG/PNG needs Graphviz's `dot` program, which is not installed.\n"
            "  install it: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS),\n"
            "  or `conda install graphviz`; or write DOT with `-o out.dot`",
            file=sys.stderr,
        )
        return EXIT_USER
    done = subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=text.encode(), capture_output=True)
    if done.returncode != 0:
        print(f"dsgraph: graphviz failed: {done.stderr.decode(errors='replace').strip()}", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    import hashlib

    from dsgraph import resume
    from dsgraph.runtime import env, launch, rundir

    if args.resume and args.run_dir:
        print("dsgraph: give --resume RUN_DIR or --run-dir RUN_DIR, not both", file=sys.stderr)
        return EXIT_USAGE
    try:
        ranks = env.launcher_rank()
    except env.LauncherError as error:
        print(f"dsgraph: {error}", file=sys.stderr)
        return EXIT_USAGE
    inside = ranks is not None
    procs = ranks[1] if ranks is not None else (args.procs or env.gpu_count() or 2)
    # Compile first: a wrong file stops here, before any worker starts.
    # `run` runs the user's code anyway: `zero = auto` may size factory models.
    result = _load(args.file, procs, tuple(args.overrides), args.device_memory, trust_user_code=True)
    if result is None:
        return EXIT_USAGE
    _print_diagnostics(result)
    if not result.ok or _missing_models(result, "not started") or _missing_packages(result):
        return EXIT_USER
    plan = result.plan
    assert plan is not None  # no error: it was planned
    if args.resume:
        run_dir = Path(args.resume)
    elif inside:
        run_dir = Path(args.run_dir or f"runs/{plan.pipeline}-{os.environ['MASTER_PORT']}")
    else:
        run_dir = Path(args.run_dir) if args.run_dir else launch.default_run_dir(plan.pipeline)
    if inside:  # every rank of the launcher's job computes the same id
        job = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}:{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
        run_id = hashlib.sha256(job.encode()).hexdigest()[:16]
    else:
        run_id = rundir.new_run_id()
    if args.resume and not os.path.lexists(run_dir):  # DSG502, and nothing created
        _print_list(resume.check(run_dir, plan, procs, result)[1], result)
        return EXIT_USER
    try:
        rundir.prepare(run_dir)
        lock = None if inside else rundir.RunLock.acquire(run_dir, run_id)  # held until this process ends
        manifest = None
        if args.resume:
            manifest, diags = resume.check(run_dir, plan, procs, result)
            if manifest is None:
                _print_list(diags, result)
                return EXIT_USER
        launch.write_plan(run_dir, plan.to_json())
    except rundir.EnvironmentFault as fault:
        print(f"dsgraph: {fault}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    if inside:
        try:
            return launch.run_here(run_dir, run_id, manifest)
        except rundir.EnvironmentFault as fault:
            print(f"dsgraph: {fault}", file=sys.stderr)
            return EXIT_ENVIRONMENT
    resumed = f", resuming from {manifest.name}" if manifest else ""
    print(f"dsgraph: {procs} processes, run directory {run_dir}{resumed}", file=sys.stderr)
    try:
        code = launch.launch(run_dir, procs, args.hang_timeout, run_id, manifest)
    except rundir.EnvironmentFault as fault:  # the workers' environment: e.g. no op cache usable
        print(f"dsgraph: {fault}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    assert lock is not None
    lock.release()
    return code


def _print_list(diags: list[Diagnostic], result: Compilation) -> None:
    from dsgraph.diagnostics import render_summary, render_text

    for diag in diags:
        print(render_text(diag, result.sources), file=sys.stderr)
    print(render_summary(diags, result.source.name), file=sys.stderr)
