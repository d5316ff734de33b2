"""ControllerConfig: defaults < config file (TOML/JSON/YAML, or `KVFUSE_CONTROLLER_CONFIG`) <
`KVFUSE_CONTROLLER_*` env < flags."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from kvfuse.errors import ConfigError
from kvfuse.service.config import (
    ConfigLayers,
    Parser,
    check_port,
    check_tls_files,
    optional,
    parse_addrs,
    parse_float,
    parse_int,
    require,
)

ENV_PREFIX = "KVFUSE_CONTROLLER_"


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a controller process needs, read once and passed down.

    Attributes:
        host, port: gRPC listen address (port 0 picks a free one).
        metrics_port: Prometheus HTTP port on `host`; None disables, 0 picks a free port.
        auth_token: bearer token callers must present; None turns auth off.
        tls_cert, tls_key: the controller's certificate chain and key (PEM); both or neither.
        calibration: a `kvfuse calibrate` file; its r_quality is the ratio floor.
        r_quality: the floor without a calibration file.
        r_max: the ratio is never set above this.
        cache_addrs: cache servers in local mode (static membership; names = addresses).
        namespace: discover pods in this Kubernetes namespace instead of `cache_addrs`.
        cache_selector, prefill_selector: label selectors of cache-server and prefill pods.
        cache_port: the cache servers' gRPC port (pod IP + this port).
        prefill_port: the prefill workers' gRPC port.
        resync_s: how often discovery re-lists the pods besides watching them.
        half_life: samples after which an old measurement weighs half.
        refresh_s: how often the estimates are turned into a new policy (at most).
        cache_token: the cache servers' admin-tenant token (placement sees and moves every
            tenant's objects); default: `auth_token`.
        cache_tls_ca: PEM roots of the cache servers' certificates; enables TLS to them.
        placement_interval_s: seconds between placement rounds; 0 turns placement off.
        max_moves_per_s: the placement's move budget (moves per round = this x interval).
        fill: share of each tier's capacity placement keeps in use (the rest is headroom).
        hot_min: heat (decayed lookups that found it) an object needs to be promoted.
        num_workers: gRPC threads; each policy watcher (prefill worker) holds one.
        grace_s: how long a graceful stop waits for in-flight calls.
    """

    host: str = "127.0.0.1"
    port: int = 50061
    metrics_port: int | None = 9466
    auth_token: str | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    calibration: Path | None = None
    r_quality: float = 0.15
    r_max: float = 0.6
    cache_addrs: tuple[str, ...] = ()
    namespace: str | None = None
    cache_selector: str = "app.kubernetes.io/component=cache"
    prefill_selector: str = "app.kubernetes.io/component=prefill"
    cache_port: int = 50051
    prefill_port: int = 50052
    resync_s: float = 300.0
    half_life: int = 200
    refresh_s: float = 2.0
    cache_token: str | None = field(default=None, repr=False)
    cache_tls_ca: Path | None = None
    placement_interval_s: float = 5.0
    max_moves_per_s: float = 20.0
    fill: float = 0.85
    hot_min: float = 2.0
    num_workers: int = 64
    grace_s: float = 2.0

    def __post_init__(self) -> None:
        check_port("port", self.port)
        check_port("metrics_port", self.metrics_port)
        check_tls_files(self.tls_cert, self.tls_key)
        for name in ("r_quality", "r_max"):
            value = getattr(self, name)
            require(math.isfinite(value) and 0 <= value <= 1, f"{name} must be in [0, 1]")
        require(self.r_quality <= self.r_max, "r_quality must not exceed r_max")
        for name in ("resync_s", "refresh_s"):
            require(getattr(self, name) > 0, f"{name} must be positive")
        require(self.half_life >= 1 and self.num_workers >= 2, "half_life >= 1, num_workers >= 2")
        require(self.grace_s >= 0, "grace_s must be >= 0")
        require(self.placement_interval_s >= 0, "placement_interval_s must be >= 0")
        require(self.max_moves_per_s > 0 and self.hot_min >= 0, "max_moves_per_s > 0, hot_min >= 0")
        require(0 < self.fill <= 1, "fill must be in (0, 1]")
        parse_addrs(self.cache_addrs)
        if self.namespace is not None and self.cache_addrs:
            raise ConfigError("namespace (Kubernetes discovery) and cache_addrs exclude each other")

    @classmethod
    def load(
        cls,
        config_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, Any] | None = None,
    ) -> ControllerConfig:
        env = os.environ if env is None else env
        return replace(cls(), **_LAYERS.parse(_LAYERS.merge(config_file, env, flags)))

    @property
    def effective_cache_token(self) -> str | None:
        return self.cache_token if self.cache_token is not None else self.auth_token


_PARSERS: dict[str, Parser] = {
    "host": str,
    "port": parse_int,
    "metrics_port": optional(parse_int),
    "auth_token": optional(str),
    "tls_cert": optional(Path),
    "tls_key": optional(Path),
    "calibration": optional(Path),
    "r_quality": parse_float,
    "r_max": parse_float,
    "cache_addrs": parse_addrs,
    "namespace": optional(str),
    "cache_selector": str,
    "prefill_selector": str,
    "cache_port": parse_int,
    "prefill_port": parse_int,
    "resync_s": parse_float,
    "half_life": parse_int,
    "refresh_s": parse_float,
    "cache_token": optional(str),
    "cache_tls_ca": optional(Path),
    "placement_interval_s": parse_float,
    "max_moves_per_s": parse_float,
    "fill": parse_float,
    "hot_min": parse_float,
    "num_workers": parse_int,
    "grace_s": parse_float,
}
assert set(_PARSERS) == {f.name for f in fields(ControllerConfig)}

_LAYERS = ConfigLayers(
    service="controller",
    env_prefix=ENV_PREFIX,
    parsers=_PARSERS,
    env_aliases={"auth_token": "KVFUSE_AUTH_TOKEN"},
)
