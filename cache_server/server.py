"""The cache-server process: tiers, gRPC server (service, health, reflection), metrics endpoint."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache_server.auth import Authenticator
from cache_server.config import CacheServerConfig
from cache_server.interceptors import AuthInterceptor, ObservingInterceptor
from cache_server.metrics import CacheMetrics, MetricsServer
from cache_server.servicer import CacheServicer
from cache_server.store import TieredStore
from cache_server.tiers.base import Tier
from kvfuse.errors import ConfigError
from kvfuse.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def build_tiers(config: CacheServerConfig) -> list[Tier]:
    """The configured tiers, fastest first: memory, then disk and Redis when enabled."""
    from cache_server.tiers.memory import MemoryTier

    tiers: list[Tier] = [MemoryTier(config.memory_bytes, codec=config.memory_codec)]
    if config.disk_dir is not None:
        from cache_server.tiers.disk import DiskTier

        tiers.append(DiskTier(config.disk_dir, config.disk_bytes, codec=config.disk_codec))
    if config.redis_url is not None:
        from cache_server.tiers.redis_tier import RedisTier

        tiers.append(RedisTier(config.redis_url, config.redis_bytes, codec=config.redis_codec))
    return tiers


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _server_credentials(config: CacheServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = _read(config.tls_client_ca) if config.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key), _read(config.tls_cert))],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


class CacheServer:
    """A cache server: start it, talk to `port`, stop it (or use it as a context manager).

    Owns the store (closed on `stop`) and the metrics endpoint. `start` binds both ports and
    returns once they accept connections; `stop` drains in-flight RPCs for `grace_s`.
    """

    def __init__(self, config: CacheServerConfig, tiers: list[Tier] | None = None) -> None:
        self.config = config
        tiers = build_tiers(config) if tiers is None else tiers
        self.store = TieredStore(tiers)
        self.metrics = CacheMetrics()
        self.metrics.watch_store(self.store)
        self._health = health.HealthServicer()
        auth = Authenticator(config.tokens)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.num_workers, thread_name_prefix="kvfuse-cache"),
            interceptors=[ObservingInterceptor(self.metrics), AuthInterceptor(auth)],
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
                # ping idle connections so streams of vanished clients are cancelled
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
            maximum_concurrent_rpcs=4 * config.num_workers,
        )
        tier_codecs = {t.name: t.codec for t in tiers}
        servicer = CacheServicer(self.store, config, auth, self.metrics, tier_codecs)
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, self._server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = 0
        self._metrics_server: MetricsServer | None = None
        self._stopped = False

    @property
    def address(self) -> str:
        """host:port clients connect to (valid after `start`)."""
        return _address(self.config.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.port

    def start(self) -> CacheServer:
        address = _address(self.config.host, self.config.port)
        credentials = _server_credentials(self.config)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {address}")
        if self.config.metrics_port is not None:
            self._metrics_server = MetricsServer(
                self.metrics, self.config.host, self.config.metrics_port
            )
        self._server.start()
        for service in ("", SERVICE_NAME):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.debug("cache server listening on %s", self.address)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stops taking RPCs, waits up to `grace_s` (default: config) for in-flight ones, then
        closes the metrics endpoint and the store. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace_s is None else grace_s
        self._server.stop(grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        self.store.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (or `timeout_s` passes); True if it stopped."""
        timed_out = self._server.wait_for_termination(timeout_s)
        return not timed_out

    def __enter__(self) -> CacheServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
