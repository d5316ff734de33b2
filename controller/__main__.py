"""`python -m controller`: run the controller (same flags as `kvfuse serve controller`)."""

from __future__ import annotations

import sys

from controller.serve import add_arguments, run
from kvfuse.service.runner import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main("controller", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
