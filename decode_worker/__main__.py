"""`python -m decode_worker` and `kvfuse serve decode`: load the model, serve HTTP until stopped."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence

from decode_worker.config import DecodeConfig, add_arguments, from_args
from kvfuse.errors import ConfigError, KvfuseError

log = logging.getLogger("decode_worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decode_worker", description="kvfuse decode worker (OpenAI-compatible HTTP)"
    )
    add_arguments(parser)
    return parser


def serve(config: DecodeConfig) -> None:
    """Blocks serving HTTP on `config.host:config.port` until SIGINT/SIGTERM.

    Logs `decode worker listening on http://host:port` once the socket is bound (port 0 picks
    a free port) and the model is loaded.
    """
    import uvicorn

    from decode_worker.app import create_app
    from decode_worker.service import DecodeService

    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(DecodeService.from_config(config))
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("decode worker listening on http://%s:%d", shown, port)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=config.log_level.lower(), timeout_graceful_shutdown=10)
    )
    server.run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    return sock


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
