"""Running the decode worker from a command line: flags, config, load the model, serve HTTP."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
from collections.abc import Mapping
from pathlib import Path

from decode_worker.config import ENGINES, ENV_PREFIX, DecodeConfig
from kvfuse.blend import Mode
from kvfuse.blend.precompute import ChunkContext
from kvfuse.errors import ConfigError
from kvfuse.prefill.types import MissPolicy
from kvfuse.segments import DEFAULT_SEPARATOR
from kvfuse.service.malloc import tune_malloc
from kvfuse.service.runner import configure_logging
from kvfuse.settings import DTYPES

__all__ = ["add_arguments", "from_args", "run", "serve"]

log = logging.getLogger("decode_worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kvfuse serve decode` / `python -m decode_worker` flags (all default to unset)."""
    add = parser.add_argument
    add("--config", type=Path, help=f"TOML, YAML or JSON file (also {ENV_PREFIX}CONFIG)")
    add("--host", help="listen address (default 127.0.0.1; 0.0.0.0 in a container)")
    add("--port", type=int, help="listen port (default 8000; 0 = any free port)")
    add("--model", help="GGUF file or safetensors dir (default: bundled SmolLM2)")
    add("--device", help="torch device (default cpu)")
    add("--dtype", choices=sorted(DTYPES), help="weights and KV dtype (default float32)")
    add("--num-threads", type=int, help="torch threads of local prefill + decode (default torch's)")
    add("--prefill-url", help="prefill worker gRPC address; empty = prefill in this process")
    add("--prefill-token", help="bearer token for the prefill worker (default: --token)")
    add("--token", dest="auth_token", help="bearer token clients must send (KVFUSE_AUTH_TOKEN)")
    add("--served-model-name", help="model name clients send (default: from the model file)")
    add("--max-batch", type=int, help="most sequences decoding at once (default 8)")
    add("--max-model-len", type=int, help="context limit, prompt + generation (default: model's)")
    add("--kv-cache-bytes", help="KV budget of all sequences, e.g. 2GiB (default 1GiB)")
    add("--default-max-tokens", type=int, help="generation limit when a request sets none")
    add("--separator", help=f"segment separator (default {DEFAULT_SEPARATOR})")
    add("--default-mode", choices=[m.value for m in Mode], help="prefill mode (default blend)")
    add("--recompute-ratio", dest="default_recompute_ratio", type=float, help="default ratio")
    add("--chunk-context", choices=[c.value for c in ChunkContext], help="local prefill only")
    add(
        "--miss-policy",
        choices=[p.value for p in MissPolicy],
        help="local prefill only: precompute (default) or forced",
    )
    add("--prepare-threads", type=int, help="threads parsing/tokenizing bodies (default 2)")
    add("--max-body-bytes", help="largest request body, e.g. 4MiB (default 4MiB; 413)")
    add("--max-messages", type=int, help="messages per chat, parts per message (default 256)")
    add("--max-segments", type=int, help="prefix + documents + query per prompt (default 128)")
    add("--max-segment-tokens", type=int, help="tokens per segment (default 0 = the context)")
    add("--max-stop-strings", type=int, help="stop strings per request (default 16)")
    add("--max-stop-chars", type=int, help="characters per stop string (default 256)")
    add("--max-warm-documents", type=int, help="documents per /kvfuse/warm call (default 256)")
    add("--engine", choices=ENGINES, help="what decodes: embedded (default) or a vLLM server")
    add("--vllm-url", help="engine vllm: the vLLM server's http://host:port")
    add("--vllm-model", help="engine vllm: the model vLLM serves (default: ask its /v1/models)")
    add("--vllm-timeout-s", type=float, help="engine vllm: connect/read timeout (default 300)")
    add(
        "--handoff-timeout-s",
        type=float,
        help="engine vllm: wait for a hand-off's address, and its result after vLLM (default 5)",
    )
    add("--log-level", help="debug, info, warning, error (default info)")


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> DecodeConfig:
    """The config of a parsed `add_arguments` namespace, over the file and env."""
    flags = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    names = {f.name for f in dataclasses.fields(DecodeConfig)}
    return DecodeConfig.load(args.config, env, {k: v for k, v in flags.items() if k in names})


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
