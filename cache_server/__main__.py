"""`python -m cache_server`: run the kvfuse cache server (same flags as `kvfuse serve cache`)."""

from __future__ import annotations

import argparse
import sys

from cache_server.serve import add_arguments, run
from kvfuse.errors import KvfuseError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cache_server", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvfuseError as exc:
        print(f"cache_server: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
