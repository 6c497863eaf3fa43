"""The process that runs torch's elastic launcher for `dsgraph run`: `torch.distributed.run`,
called as a library so that its own failure report (a traceback of ChildFailedError) does not
bury dsgraph's one-line report. It records which ranks failed, and how, in the run
directory (the last argument) for the driver. The workers' output passes through."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    run_dir = Path(argv[-1])
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        records = [
            {
                "rank": rank,
                "exitcode": failure.exitcode,
                "signal": failure.signal_name() if failure.exitcode < 0 else None,
            }
            for rank, failure in sorted(error.failures.items())
        ]
        (run_dir / "agent_failure.json").write_text(json.dumps(records) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
