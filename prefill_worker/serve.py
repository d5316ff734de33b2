"""Running the prefill worker from a command line: flags, config, listen, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import TextIO

from prefill_worker.config import PrefillConfig

# flag dest → config field, for flags whose name differs from the field
_FIELD_OF_FLAG = {"token": "auth_token", "cache": "cache_addrs"}
_FLAGS = (
    ("--host", "gRPC and metrics listen address (default 127.0.0.1)"),
    ("--port", "gRPC port (default 50052; 0 picks a free one)"),
    ("--metrics-port", "Prometheus port (default 9465; 0 picks a free one, 'off' disables)"),
    ("--cache", "cache servers, comma-separated host:port (default: in-process store)"),
    ("--cache-token", "bearer token for the cache servers (default: --token)"),
    ("--token", "bearer token callers must present (or KVFUSE_AUTH_TOKEN)"),
    ("--tls-cert", "the worker's certificate chain (PEM); enables TLS with --tls-key"),
    ("--tls-key", "the worker's private key (PEM)"),
    ("--cache-tls-ca", "CA (PEM) of the cache servers' certificates; enables TLS to them"),
    ("--model", "GGUF file or safetensors dir (default: bundled SmolLM2)"),
    ("--dtype", "float32, bfloat16 or float16 (default float32)"),
    ("--device", "torch device (default cpu)"),
    ("--num-threads", "torch intra-op threads (default: torch's choice)"),
    ("--chunk-context", "none, bos or prefix (default prefix)"),
    ("--default-ratio", "recompute ratio when a request sets none (default: engine's)"),
    ("--write-behind-size", "missing chunks queued for store before dropping (default 64)"),
    ("--lookup-deadline-s", "cache lookup deadline (default 1)"),
    ("--fetch-deadline-s", "deadline of a request's layer streams (default 10)"),
    ("--put-deadline-s", "deadline of one write-behind put (default 30)"),
    ("--num-workers", "gRPC worker threads (default 8)"),
    ("--grace-s", "seconds in-flight requests get on shutdown (default 5)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags; each overrides its env var KVFUSE_PREFILL_<NAME> and config file key."""
    parser.add_argument("--config", help="TOML/JSON settings file (or KVFUSE_PREFILL_CONFIG)")
    for flag, help_text in _FLAGS:
        parser.add_argument(flag, default=None, help=help_text)


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> PrefillConfig:
    """Settings from the config file, the environment and the parsed flags (in that order)."""
    flags = {}
    for flag, _ in _FLAGS:
        dest = flag[2:].replace("-", "_")
        flags[_FIELD_OF_FLAG.get(dest, dest)] = getattr(args, dest)
    return PrefillConfig.load(args.config, env, flags)


def serve(config: PrefillConfig, out: TextIO = sys.stdout) -> int:
    """Runs a worker until SIGINT or SIGTERM, then stops it gracefully. Main thread only."""
    from prefill_worker.server import PrefillServer

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    server = PrefillServer(config)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        cache = ",".join(config.cache_addrs) or "in-process store"
        metrics = "off" if server.metrics_port is None else f"port {server.metrics_port}"
        tls, auth = ("on" if on else "off" for on in (config.tls_cert, config.auth_token))
        print(
            f"kvfuse prefill worker listening on {server.address} "
            f"(tls {tls}, auth {auth}, cache {cache}, metrics {metrics})",
            file=out,
            flush=True,
        )
        stop.wait()
        print("kvfuse prefill worker stopping", file=out, flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run(args: argparse.Namespace) -> int:
    """`kvfuse serve prefill` / `python -m prefill_worker`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(load_config(args))
