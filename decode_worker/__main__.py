"""`python -m decode_worker`: run the decode worker (same flags as `kvfuse serve decode`)."""

from __future__ import annotations

import argparse
import sys

from decode_worker.serve import add_arguments, run
from kvfuse.errors import KvfuseError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decode_worker", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvfuseError as exc:
        print(f"decode_worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
