"""The process that runs torch's elastic launcher for `dsgraph run`: `torch.distributed.run`,
called as a library so that its own failure report (a traceback of ChildFailedError) does not
bury dsgraph's one-line report.

    python -m dsgraph.runtime.agent RUN_DIR TORCHRUN_ARGUMENTS...

It records which ranks failed, and how, in RUN_DIR/agent_failure.json for the driver (written
whole or not at all: on a full disk the driver finds no record, never a torn one). The workers'
output passes through."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from dsgraph.runtime.rundir import is_environment_error, write_new


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    run_dir, torchrun = Path(argv[0]), argv[1:]
    try:
        run(parse_args(torchrun))
    except ChildFailedError as error:
        records = [
            {
                "rank": rank,
                "exitcode": failure.exitcode,
                "signal": failure.signal_name() if failure.exitcode < 0 else None,
            }
            for rank, failure in sorted(error.failures.items())
        ]
        _write(run_dir / "agent_failure.json", json.dumps(records) + "\n")
        return 1
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        write_new(tmp, text)
        tmp.replace(path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not is_environment_error(error):  # a full disk: the ranks' own reserved records tell it
            print(f"dsgraph: cannot record the failed ranks in {path}: {error.strerror or error}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
