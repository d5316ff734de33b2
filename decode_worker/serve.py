"""Running the decode worker from a command line: flags, config, load the model, serve HTTP."""

from __future__ import annotations

import argparse
import logging
import socket

from decode_worker.config import DecodeConfig, add_arguments, from_args
from kvfuse.errors import ConfigError
from kvfuse.service.malloc import tune_malloc
from kvfuse.service.runner import configure_logging

__all__ = ["add_arguments", "run", "serve"]

log = logging.getLogger("decode_worker")


def serve(config: DecodeConfig) -> None:
    """Blocks serving HTTP on `config.host:config.port` until SIGINT/SIGTERM.

    Logs `decode worker listening on http://host:port` once the socket is bound (port 0 picks
    a free port) and the model is loaded, after a WARNING if no auth token is set.
    """
    import uvicorn

    from decode_worker.app import create_app
    from decode_worker.service import DecodeService

    configure_logging(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # engine vllm: a line per request
    app = create_app(DecodeService.from_config(config))
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not config.auth_token:
        log.warning(
            "NO AUTH TOKEN: every client that reaches http://%s:%d is served unauthenticated "
            "(set --token or KVFUSE_AUTH_TOKEN)",
            shown,
            port,
        )
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
    """`kvfuse serve decode` / `python -m decode_worker` with parsed `add_arguments` flags.

    Raises:
        ConfigError (and other KvfuseErrors): bad settings, model not loadable, port taken.
    """
    tune_malloc()  # received fused layers are large and short-lived: keep freed pages for reuse
    serve(from_args(args))
    return 0
