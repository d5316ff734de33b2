"""Running the cache server from a command line: flags, config, listen, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType
from typing import TextIO

from cache_server.config import CacheServerConfig

# flag dest → config field, for flags whose name differs from the field
_FIELD_OF_FLAG = {"token": "auth_token", "tokens_file": "auth_tokens_file"}
_FLAGS = (
    ("--host", "gRPC and metrics listen address (default 127.0.0.1)"),
    ("--port", "gRPC port (default 50051; 0 picks a free one)"),
    ("--metrics-port", "Prometheus port (default 9464; 0 picks a free one, 'off' disables)"),
    ("--memory-bytes", "memory tier budget, e.g. 2GiB"),
    ("--memory-codec", "memory tier codec (raw, fp16, int8, int4, cachegen)"),
    ("--disk-dir", "enable the disk tier in this directory"),
    ("--disk-bytes", "disk tier budget"),
    ("--disk-codec", "disk tier codec"),
    ("--redis-url", "enable the Redis tier, e.g. redis://127.0.0.1:6379/0"),
    ("--redis-bytes", "Redis tier budget"),
    ("--redis-codec", "Redis tier codec"),
    ("--token", "bearer token of tenant 'default' (or KVFUSE_AUTH_TOKEN)"),
    ("--tokens-file", "file of '<tenant> <token>' lines"),
    ("--tls-cert", "server certificate chain (PEM); enables TLS with --tls-key"),
    ("--tls-key", "server private key (PEM)"),
    ("--tls-client-ca", "require client certificates signed by this CA (mTLS)"),
    ("--max-message-bytes", "gRPC message limit (default 16MiB)"),
    ("--max-object-bytes", "largest object a Put may store (default 1GiB)"),
    ("--max-batch-keys", "most keys per Lookup/GetLayers/Delete (default 1024)"),
    ("--num-workers", "gRPC worker threads (default 16)"),
    ("--grace-s", "seconds in-flight RPCs get on shutdown (default 5)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags; each overrides its env var KVFUSE_CACHE_<NAME> and config file key."""
    parser.add_argument("--config", help="TOML/YAML settings file (or KVFUSE_CACHE_CONFIG)")
    for flag, help_text in _FLAGS:
        parser.add_argument(flag, default=None, help=help_text)


def load_config(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> CacheServerConfig:
    """Settings from the config file, the environment and the parsed flags (in that order)."""
    flags = {}
    for flag, _ in _FLAGS:
        dest = flag[2:].replace("-", "_")
        flags[_FIELD_OF_FLAG.get(dest, dest)] = getattr(args, dest)
    return CacheServerConfig.load(args.config, env, flags)


def serve(config: CacheServerConfig, out: TextIO = sys.stdout) -> int:
    """Runs a server until SIGINT or SIGTERM, then stops it gracefully. Main thread only."""
    from cache_server.server import CacheServer

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    server = CacheServer(config)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        tiers = "+".join(s.name for s in server.store.stats())
        metrics = "off" if server.metrics_port is None else f"port {server.metrics_port}"
        print(
            f"kvfuse cache server listening on {server.address} "
            f"(tls {'on' if config.tls_cert else 'off'}, auth {'on' if config.tokens else 'off'}, "
            f"tiers {tiers}, metrics {metrics})",
            file=out,
            flush=True,
        )
        stop.wait()
        print("kvfuse cache server stopping", file=out, flush=True)
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run(args: argparse.Namespace) -> int:
    """`kvfuse serve cache` / `python -m cache_server`."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(load_config(args))
