"""Running the controller from a command line: flags, config, listen, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TextIO

from controller.config import ControllerConfig
from kvfuse.service.config import FlagTable
from kvfuse.service.runner import configure_logging, run_until_signal

_FLAGS = FlagTable(
    (
        ("--host", "gRPC and metrics listen address (default 127.0.0.1)"),
        ("--port", "gRPC port (default 50061; 0 picks a free one)"),
        ("--metrics-port", "Prometheus port (default 9466; 0 picks a free one, 'off' disables)"),
        ("--token", "bearer token callers must present (or KVFUSE_AUTH_TOKEN)"),
        ("--tls-cert", "the controller's certificate chain (PEM); enables TLS with --tls-key"),
        ("--tls-key", "the controller's private key (PEM)"),
        ("--calibration", "a `kvfuse calibrate` file: its r_quality is the ratio floor"),
        ("--r-quality", "the ratio floor without a calibration file (default 0.15)"),
        ("--r-max", "the ratio cap (default 0.6)"),
        ("--cache", "cache servers, comma-separated host:port (local mode)"),
        ("--namespace", "discover cache and prefill pods in this Kubernetes namespace"),
        ("--cache-selector", "label selector of cache-server pods"),
        ("--prefill-selector", "label selector of prefill-worker pods"),
        ("--cache-port", "cache servers' gRPC port (default 50051)"),
        ("--prefill-port", "prefill workers' gRPC port (default 50052)"),
        ("--resync-s", "seconds between full pod re-lists besides the watch (default 300)"),
        ("--half-life", "samples after which a measurement weighs half (default 200)"),
        ("--refresh-s", "seconds between policy rebuilds (default 2)"),
        ("--cache-token", "the cache servers' admin-tenant token (default: --token)"),
        ("--cache-tls-ca", "CA (PEM) of the cache servers' certificates; enables TLS to them"),
        ("--placement-interval-s", "seconds between placement rounds; 0 turns it off (5)"),
        ("--max-moves-per-s", "placement moves per second at most (default 20)"),
        ("--fill", "share of each tier's capacity placement keeps in use (default 0.85)"),
        ("--hot-min", "heat an object needs to be promoted into memory (default 2)"),
        ("--num-workers", "gRPC threads; each watching worker holds one (default 64)"),
        ("--grace-s", "seconds in-flight calls get on shutdown (default 2)"),
    ),
    renamed={"token": "auth_token", "cache": "cache_addrs"},
    config_help="TOML/JSON/YAML settings file (or KVFUSE_CONTROLLER_CONFIG)",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The controller's flags; each overrides its env var and config-file key."""
    _FLAGS.add_to(parser)


def load_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ControllerConfig:
    return ControllerConfig.load(args.config, env, _FLAGS.values(args))


def serve(config: ControllerConfig, out: TextIO = sys.stdout) -> int:
    """Runs a controller until SIGINT or SIGTERM. Main thread only."""
    from controller.server import ControllerServer

    server = ControllerServer(config)

    def details() -> str:
        members = f"namespace {config.namespace}" if config.namespace else "static"
        policy = server.board.policy
        return f"r_quality {policy.ratio.r_quality} ({policy.r_quality_source}), {members}"

    return run_until_signal(server, "kvfuse controller", details, out)


def run(args: argparse.Namespace) -> int:
    """`kvfuse serve controller` / `python -m controller`."""
    configure_logging()
    return serve(load_config(args))
