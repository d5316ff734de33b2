"""Running the cache server from a command line: flags, config, listen, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TextIO

from cache_server.config import CacheServerConfig
from kvfuse.service.config import FlagTable
from kvfuse.service.malloc import tune_malloc
from kvfuse.service.runner import configure_logging, run_until_signal

_FLAGS = FlagTable(
    (
        ("--host", "gRPC and metrics listen address (default 127.0.0.1)"),
        ("--port", "gRPC port (default 50051; 0 picks a free one)"),
        ("--metrics-port", "Prometheus port (default 9464; 0 picks a free one, 'off' disables)"),
        (
            "--bulk-port",
            "bulk-read socket port (default 0: a free one, announced to clients in Stats; "
            "'off' disables)",
        ),
        (
            "--lmcache-port",
            "serve LMCache's remote protocol (remote_url lm://host:port) on this port, a "
            "drop-in for lmcache_server; no authentication (default off; 0 picks a free one)",
        ),
        ("--lmcache-host", "LMCache port listen address, not --host's (default 127.0.0.1)"),
        ("--lmcache-max-connections", "LMCache connections served at once (default 256)"),
        ("--memory-bytes", "memory tier budget, e.g. 2GiB (default 1GiB)"),
        ("--memory-codec", "memory tier codec: raw, fp16, int8, int4, cachegen (default raw)"),
        ("--disk-dir", "enable the disk tier in this directory"),
        ("--disk-bytes", "disk tier budget (default 10GiB)"),
        ("--disk-codec", "disk tier codec (default raw)"),
        (
            "--disk-fsync",
            "fsync every disk object (true/false, default false: a crash may lose the newest "
            "objects; checksums keep anything incomplete from being served)",
        ),
        (
            "--disk-direct-io",
            "write disk objects past the page cache with O_DIRECT (true/false, default false)",
        ),
        ("--redis-url", "enable the Redis tier, e.g. redis://127.0.0.1:6379/0"),
        ("--redis-bytes", "Redis tier budget (default 1GiB)"),
        ("--redis-codec", "Redis tier codec (default int8)"),
        (
            "--promote-after-hits",
            "recent reads below the memory tier before a whole-object read copies an object "
            "up (default 2; 1 promotes on every such read)",
        ),
        (
            "--write-back-from",
            "memory fill fraction above which its least recently used objects are copied to "
            "the next tier ahead of eviction (default 0.7; 'off' disables)",
        ),
        ("--token", "bearer token of tenant 'default' (or KVFUSE_AUTH_TOKEN)"),
        ("--tokens-file", "file of '<tenant> <token>' lines"),
        (
            "--admin-tenant",
            "the tenant whose Stats show server-wide counters (default 'default'; other "
            "tenants see each tier's name, state, codec and capacity)",
        ),
        ("--tls-cert", "server certificate chain (PEM); enables TLS with --tls-key"),
        ("--tls-key", "server private key (PEM)"),
        ("--tls-client-ca", "require client certificates signed by this CA (mTLS)"),
        ("--max-message-bytes", "gRPC message limit (default 16MiB)"),
        ("--max-object-bytes", "largest object a Put may store (default 1GiB)"),
        (
            "--max-upload-bytes",
            "budget of bytes announced by unfinished Puts, all streams together; a Put that "
            "does not fit is refused with RESOURCE_EXHAUSTED (default 0: --memory-bytes)",
        ),
        ("--max-batch-keys", "most keys per Lookup/GetLayers/Delete (default 1024)"),
        ("--num-workers", "gRPC worker threads (default 16)"),
        ("--grace-s", "seconds in-flight RPCs get on shutdown (default 5)"),
        (
            "--drain-s",
            "seconds a shutdown may then spend copying objects only memory holds into the "
            "next tier, disk else Redis (default 20; 0 disables)",
        ),
    ),
    renamed={"token": "auth_token", "tokens_file": "auth_tokens_file"},  # flag dest → field
    config_help="TOML/YAML settings file (or KVFUSE_CACHE_CONFIG)",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's flags; each overrides its env var KVFUSE_CACHE_<NAME> and config file key."""
    _FLAGS.add_to(parser)


def load_config(
    args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> CacheServerConfig:
    """Settings from the config file, the environment and the parsed flags (in that order)."""
    return CacheServerConfig.load(args.config, env, _FLAGS.values(args))


def serve(config: CacheServerConfig, out: TextIO = sys.stdout) -> int:
    """Runs a server until SIGINT or SIGTERM, then stops it gracefully. Main thread only."""
    from cache_server.server import CacheServer

    server = CacheServer(config)

    def details() -> str:
        tiers = "+".join(s.name for s in server.store.stats())
        metrics = "off" if server.metrics_port is None else f"port {server.metrics_port}"
        bulk = "off" if server.bulk_port is None else f"port {server.bulk_port}"
        lmcache = "off" if server.lmcache_port is None else f"{server.lmcache_address} (no auth)"
        return (
            f"tls {'on' if config.tls_cert else 'off'}, auth {'on' if config.tokens else 'off'}, "
            f"tiers {tiers}, metrics {metrics}, bulk {bulk}, lmcache {lmcache}"
        )

    return run_until_signal(server, "kvfuse cache server", details, out)


def run(args: argparse.Namespace) -> int:
    """`kvfuse serve cache` / `python -m cache_server`."""
    import torch

    # Transcoding runs on the gRPC worker threads, many at once: torch's own intra-op pool on
    # top of that only oversubscribes the cores (re-encoding one chunk took 9× longer under load).
    torch.set_num_threads(1)
    tune_malloc()  # layer records are large and short-lived: keep freed pages for reuse
    configure_logging()
    return serve(load_config(args))
