"""The process that runs torch's elastic launcher for `dsgraph run`: `torch.distributed.run`,
called as a library so that its own failure report (a traceback of ChildFailedError) does not
bury dsgraph's one-line report of what failed where. The workers' output passes through."""
from __future__ import annotations

import logging
import sys


def main(argv: list[str]) -> int:
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError:
        return 1        # the driver reads the workers' own reports to say what failed
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
