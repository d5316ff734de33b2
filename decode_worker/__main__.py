"""`python -m decode_worker`: run the decode worker (same flags as `kvfuse serve decode`)."""

from __future__ import annotations

import sys

from decode_worker.serve import add_arguments, run
from kvfuse.service.runner import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main("decode_worker", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
