"""`python -m prefill_worker`: run the prefill worker (same flags as `kvfuse serve prefill`)."""

from __future__ import annotations

import sys

from kvfuse.service.runner import run_main
from prefill_worker.serve import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    return run_main("prefill_worker", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
