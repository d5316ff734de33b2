"""`python -m decode_worker` and `kvfuse serve decode`: load the model, serve HTTP until stopped."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from decode_worker.config import DecodeConfig, add_arguments, from_args
from kvfuse.errors import KvfuseError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decode_worker", description="kvfuse decode worker (OpenAI-compatible HTTP)"
    )
    add_arguments(parser)
    return parser


def serve(config: DecodeConfig) -> None:
    """Blocks serving HTTP on `config.host:config.port` until SIGINT/SIGTERM."""
    import uvicorn

    from decode_worker.app import create_app
    from decode_worker.service import DecodeService

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(DecodeService.from_config(config))
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level.lower(),
        timeout_graceful_shutdown=10,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point shared with `kvfuse serve decode`; 2 on a configuration error."""
    try:
        serve(from_args(args))
    except KvfuseError as exc:
        print(f"decode_worker: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
