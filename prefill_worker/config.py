"""Prefill-worker settings: one frozen, validated object built from a config file, env and flags."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvfuse.errors import ConfigError
from kvfuse.prefill.types import MissPolicy
from kvfuse.service.config import (
    ConfigLayers,
    Parser,
    check_port,
    check_tls_files,
    optional,
    parse_addrs,
    parse_bool,
    parse_float,
    parse_int,
)
from kvfuse.transport.protocol import MIN_MESSAGE_BYTES

ENV_PREFIX = "KVFUSE_PREFILL_"
DTYPES = ("float32", "bfloat16", "float16")
CHUNK_CONTEXTS = ("none", "bos", "prefix")


@dataclass(frozen=True)
class PrefillConfig:
    """Everything a prefill-worker process needs, read once in `__main__` and passed down.

    Every field can be set in a TOML/JSON config file (same name), by an env var
    `KVFUSE_PREFILL_<NAME>` and by a flag `--<name-with-dashes>`; flags win over env, env over
    the file. `KVFUSE_AUTH_TOKEN` (shared by all kvfuse services) is an alias of `auth_token`.

    Attributes:
        host, port: gRPC listen address; port 0 picks a free port.
        metrics_port: Prometheus HTTP port on `host`; None disables, 0 picks a free port.
        cache_addrs: cache servers (`host:port`); keys are spread over them by rendezvous
            hashing. Empty: chunks live in the worker's own in-process store.
        cache_token: bearer token presented to the cache servers (default: `auth_token`).
        auth_token: bearer token callers must present; None turns auth off.
        tls_cert, tls_key: the worker's certificate chain and key (PEM); both or neither.
        cache_tls_ca: PEM roots that signed the cache servers' certificates; enables TLS to them.
        model, dtype, device, num_threads, chunk_context, tenant_salt: the engine.
        default_ratio: recompute ratio when a request sets none; None keeps the engine's.
        miss_policy: `precompute` (default): a request precomputes its missing chunks
            standalone, reuses them like hits and hands them to the write-behind, which only
            stores them; `forced`: misses are computed in place and the write-behind computes
            them again to store them (see `kvfuse.prefill.types.MissPolicy`).
        pipeline: overlap layer fetch, blend and sending layer by layer (default). False waits
            until every hit has fully arrived, computes every layer, then sends them (the
            benchmark's "pipeline off").
        write_behind_size: chunk objects queued for store; beyond it work is dropped (0: never
            store missing chunks).
        max_chunks: chunks one request may carry; more are refused (INVALID_ARGUMENT) before
            any work, since each costs a lookup and, when missing, a precompute.
        lookup_deadline_s: deadline of one Lookup batch.
        fetch_deadline_s: deadline of one GetLayers stream (all layers of a request's hits).
        put_deadline_s: deadline of one write-behind Put.
        local_store_bytes: byte budget of the in-process store (used without cache_addrs).
        max_message_bytes: gRPC send/receive message limit.
        num_workers: gRPC thread-pool size (concurrent RPCs); compute is serialized anyway.
        grace_s: how long a graceful stop waits for in-flight requests.
        controller: the controller's `host:port`; None runs on `default_ratio` and
            `cache_addrs` alone. With one, the worker reports its measurements, evaluates
            the controller's ratio policy per request and shards over the cache servers it
            names (keeping its last policy while the controller is away).
        controller_token: bearer token for the controller (default: `auth_token`).
        controller_tls_ca: PEM roots of the controller's certificate; enables TLS to it.
        member_id: this worker's id at the controller (default: host:port; in a cluster the
            pod name).
        report_interval_s: how often measurements go to the controller.
        handoff_bytes: most bytes of fused KV held for decode engines to take (hand-off
            prefills, the vLLM decode engine); the oldest entries are dropped beyond it.
        handoff_ttl_s: how long a held fused KV waits for its taker.
        advertise_address: `host:port` a decode engine's KV connector reaches this worker at
            to take a hand-off (in a cluster the pod's address); default: host:port.
    """

    host: str = "127.0.0.1"
    port: int = 50052
    metrics_port: int | None = 9465
    cache_addrs: tuple[str, ...] = ()
    cache_token: str | None = field(default=None, repr=False)
    auth_token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cache_tls_ca: Path | None = None
    model: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int = 0
    chunk_context: str = "prefix"
    tenant_salt: str = field(default="", repr=False)
    default_ratio: float | None = None
    miss_policy: MissPolicy = MissPolicy.PRECOMPUTE
    pipeline: bool = True
    write_behind_size: int = 64
    max_chunks: int = 256
    lookup_deadline_s: float = 1.0
    fetch_deadline_s: float = 10.0
    put_deadline_s: float = 30.0
    local_store_bytes: int = 2 << 30
    max_message_bytes: int = 16 << 20
    num_workers: int = 8
    grace_s: float = 5.0
    controller: str | None = None
    controller_token: str | None = field(default=None, repr=False)
    controller_tls_ca: Path | None = None
    member_id: str | None = None
    report_interval_s: float = 2.0
    handoff_bytes: int = 1 << 30
    handoff_ttl_s: float = 60.0
    advertise_address: str | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raises ConfigError on any invalid or contradictory value."""
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.chunk_context not in CHUNK_CONTEXTS:
            raise ConfigError(f"chunk_context must be one of {CHUNK_CONTEXTS}")
        ratio = self.default_ratio
        if ratio is not None and (math.isnan(ratio) or not 0.0 <= ratio <= 1.0):
            raise ConfigError(f"default_ratio must be in [0, 1], got {ratio}")
        for name in ("lookup_deadline_s", "fetch_deadline_s", "put_deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_chunks < 1:
            raise ConfigError("max_chunks must be >= 1")
        if self.write_behind_size < 0 or self.num_threads < 0 or self.grace_s < 0:
            raise ConfigError("write_behind_size, num_threads and grace_s must be >= 0")
        if self.num_workers < 1 or self.local_store_bytes <= 0:
            raise ConfigError("num_workers and local_store_bytes must be positive")
        if self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError("max_message_bytes must hold a 4 MiB frame plus headers")
        if not isinstance(self.miss_policy, MissPolicy) or not isinstance(self.pipeline, bool):
            raise ConfigError("miss_policy must be a MissPolicy and pipeline a bool")
        check_tls_files(self.tls_cert, self.tls_key)
        for addr in (*self.cache_addrs, *([self.controller] if self.controller else [])):
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"cache and controller addresses must be host:port: {addr!r}")
        if not self.report_interval_s > 0 or not self.handoff_ttl_s > 0:
            raise ConfigError("report_interval_s and handoff_ttl_s must be positive")
        if self.handoff_bytes <= 0:
            raise ConfigError("handoff_bytes must be positive")

    @property
    def effective_cache_token(self) -> str | None:
        return self.cache_token if self.cache_token is not None else self.auth_token

    @property
    def effective_controller_token(self) -> str | None:
        token = self.controller_token
        return token if token is not None else self.auth_token

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> PrefillConfig:
        """Defaults < config file (or `KVFUSE_PREFILL_CONFIG`) < env vars < flags (None = unset)."""
        env = os.environ if env is None else env
        return cls.from_mapping(_LAYERS.merge(config_file, env, flags))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrefillConfig:
        """Builds a config from raw values (strings, numbers, lists), parsing each by field."""
        return replace(cls(), **_LAYERS.parse(values))


_PARSERS: dict[str, Parser] = {
    "host": str,
    "port": parse_int,
    "metrics_port": optional(parse_int),
    "cache_addrs": parse_addrs,
    "cache_token": optional(str),
    "auth_token": optional(str),
    "tls_cert": optional(Path),
    "tls_key": optional(Path),
    "cache_tls_ca": optional(Path),
    "model": optional(str),
    "dtype": str,
    "device": str,
    "num_threads": parse_int,
    "chunk_context": str,
    "tenant_salt": str,
    "default_ratio": optional(parse_float),
    "miss_policy": MissPolicy,
    "pipeline": parse_bool,
    "write_behind_size": parse_int,
    "max_chunks": parse_int,
    "lookup_deadline_s": parse_float,
    "fetch_deadline_s": parse_float,
    "put_deadline_s": parse_float,
    "local_store_bytes": parse_int,
    "max_message_bytes": parse_int,
    "num_workers": parse_int,
    "grace_s": parse_float,
    "controller": optional(str),
    "controller_token": optional(str),
    "controller_tls_ca": optional(Path),
    "member_id": optional(str),
    "report_interval_s": parse_float,
    "handoff_bytes": parse_int,
    "handoff_ttl_s": parse_float,
    "advertise_address": optional(str),
}
assert set(_PARSERS) == {f.name for f in fields(PrefillConfig)}


_LAYERS = ConfigLayers(
    service="prefill-worker",
    env_prefix=ENV_PREFIX,
    parsers=_PARSERS,
    env_aliases={"auth_token": "KVFUSE_AUTH_TOKEN"},
    suffixes=(".toml", ".json"),
)
