"""`python -m cache_server`: run the kvfuse cache server (same flags as `kvfuse serve cache`)."""

from __future__ import annotations

import sys

from cache_server.serve import add_arguments, run
from kvfuse.service.runner import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main("cache_server", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
