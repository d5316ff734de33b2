"""`python -m prefill_worker`: run the prefill worker (same flags as `kvfuse serve prefill`)."""

from __future__ import annotations

import argparse
import sys

from kvfuse.errors import KvfuseError
from prefill_worker.serve import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefill_worker", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KvfuseError as exc:
        print(f"prefill_worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
