"""Running the prefill worker from a command line: flags, config, listen, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TextIO

from kvfuse.service.config import FlagTable
from kvfuse.service.malloc import tune_malloc
from kvfuse.service.runner import configure_logging, run_until_signal
from prefill_worker.config import PrefillConfig

_FLAGS = FlagTable(
    (
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
        (
            "--miss-policy",
            "precompute (default: a missing chunk is precomputed once, reused and stored) or "
            "forced (computed in place, then again by the write-behind)",
        ),
        ("--pipeline", "on (default) or off: overlap layer fetch, blend and send"),
        ("--write-behind-size", "missing chunks queued for store before dropping (default 64)"),
        ("--max-chunks", "chunks one request may carry; more are refused (default 256)"),
        ("--lookup-deadline-s", "cache lookup deadline (default 1)"),
        ("--fetch-deadline-s", "deadline of a request's layer streams (default 10)"),
        ("--put-deadline-s", "deadline of one write-behind put (default 30)"),
        ("--num-workers", "gRPC worker threads (default 8)"),
        ("--grace-s", "seconds in-flight requests get on shutdown (default 5)"),
        ("--controller", "controller host:port: its ratio policy and cache-server membership"),
        ("--controller-token", "bearer token for the controller (default: --token)"),
        ("--controller-tls-ca", "CA (PEM) of the controller's certificate; enables TLS to it"),
        ("--member-id", "this worker's id at the controller (default host:port; the pod name)"),
        ("--report-interval-s", "seconds between reports to the controller (default 2)"),
        ("--handoff-bytes", "fused KV held for decode engines to take (default 1 GiB)"),
        ("--handoff-ttl-s", "how long a held fused KV waits for its taker (default 60)"),
        (
            "--advertise-address",
            "host:port a decode engine's KV connector takes hand-offs at (default host:port; "
            "in a cluster the pod's address)",
        ),
    ),
    renamed={"token": "auth_token", "cache": "cache_addrs"},  # flag dest → field
    config_help="TOML/JSON settings file (or KVFUSE_PREFILL_CONFIG)",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker's flags; each overrides its env var KVFUSE_PREFILL_<NAME> and config file key."""
    _FLAGS.add_to(parser)
    parser.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_const",
        const="off",
        help="same as --pipeline off: fetch every hit, compute every layer, then send",
    )


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> PrefillConfig:
    """Settings from the config file, the environment and the parsed flags (in that order)."""
    return PrefillConfig.load(args.config, env, _FLAGS.values(args))


def serve(config: PrefillConfig, out: TextIO = sys.stdout) -> int:
    """Runs a worker until SIGINT or SIGTERM, then stops it gracefully. Main thread only."""
    from prefill_worker.server import PrefillServer

    server = PrefillServer(config)

    def details() -> str:
        cache = ",".join(config.cache_addrs) or "in-process store"
        metrics = "off" if server.metrics_port is None else f"port {server.metrics_port}"
        tls, auth = ("on" if on else "off" for on in (config.tls_cert, config.auth_token))
        controller = config.controller or "none"
        return f"tls {tls}, auth {auth}, cache {cache}, controller {controller}, metrics {metrics}"

    return run_until_signal(server, "kvfuse prefill worker", details, out)


def run(args: argparse.Namespace) -> int:
    """`kvfuse serve prefill` / `python -m prefill_worker`."""
    tune_malloc()  # fetched layer records are large and short-lived: keep freed pages for reuse
    configure_logging()
    return serve(load_config(args))
