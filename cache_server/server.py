"""The cache-server process: tiers, gRPC server (service, health, reflection), metrics endpoint."""

from __future__ import annotations

import ipaddress
import logging
import time

from cache_server.budget import UploadBudget
from cache_server.bulk import BulkServer
from cache_server.config import CacheServerConfig
from cache_server.interceptors import SERVICE_PREFIX, ObservingInterceptor
from cache_server.lmcache_port import LMCachePort
from cache_server.metrics import CacheMetrics
from cache_server.servicer import CacheServicer
from cache_server.store import TieredStore
from cache_server.tiers.base import Tier
from kvfuse.errors import ConfigError
from kvfuse.service.auth import DEFAULT_TENANT, Authenticator, AuthInterceptor
from kvfuse.service.grpc_server import GrpcServer, GrpcService, PreEncodedInterceptor
from kvfuse.service.tls import server_ssl_context
from kvfuse.v1 import cache_pb2, cache_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


def build_tiers(config: CacheServerConfig) -> list[Tier]:
    """The configured tiers, fastest first: memory, then disk and Redis when enabled."""
    from cache_server.tiers.memory import MemoryTier

    tiers: list[Tier] = [MemoryTier(config.memory_bytes, codec=config.memory_codec)]
    if config.disk_dir is not None:
        from cache_server.tiers.disk import DiskTier

        tiers.append(
            DiskTier(
                config.disk_dir,
                config.disk_bytes,
                codec=config.disk_codec,
                fsync=config.disk_fsync,
                direct_io=config.disk_direct_io,
            )
        )
    if config.redis_url is not None:
        from cache_server.tiers.redis_tier import RedisTier

        tiers.append(RedisTier(config.redis_url, config.redis_bytes, codec=config.redis_codec))
    return tiers


class CacheServer(GrpcService):
    """A cache server: start it, talk to `port`, stop it (or use it as a context manager).

    Owns the store (closed on `stop`) and the metrics endpoint. `start` binds both ports and
    returns once they accept connections (and logs a WARNING when no token is configured:
    every client is then served unauthenticated); `stop` drains in-flight RPCs for `grace_s`,
    then copies what only the memory tier holds into the next tier for up to `drain_s`.
    """

    def __init__(self, config: CacheServerConfig, tiers: list[Tier] | None = None) -> None:
        self.config = config
        tiers = build_tiers(config) if tiers is None else tiers
        self.store = TieredStore(
            tiers,
            promote_after_hits=config.promote_after_hits,
            write_back_from=config.write_back_from,
        )
        self.uploads = UploadBudget(config.upload_budget_bytes)
        self.metrics = CacheMetrics()
        self.metrics.watch_store(self.store)
        self.metrics.watch_uploads(self.uploads)
        auth = Authenticator(config.tokens)
        grpc_server = GrpcServer(
            SERVICE_NAME,
            host=config.host,
            port=config.port,
            num_workers=config.num_workers,
            max_message_bytes=config.max_message_bytes,
            thread_name_prefix="kvfuse-cache",
            interceptors=[
                ObservingInterceptor(self.metrics),  # outermost: it sees auth failures too
                AuthInterceptor(auth, SERVICE_PREFIX),
                PreEncodedInterceptor([f"{SERVICE_PREFIX}GetLayers"]),  # frames come as bytes
            ],
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_client_ca=config.tls_client_ca,
            metrics_registry=self.metrics.registry,
            metrics_port=config.metrics_port,
        )
        super().__init__(grpc_server, config.grace_s)
        tier_codecs = {t.name: t.codec for t in tiers}
        self._servicer = CacheServicer(
            self.store, config, auth, self.metrics, tier_codecs, self.uploads
        )
        cache_pb2_grpc.add_CacheServiceServicer_to_server(self._servicer, grpc_server.server)  # type: ignore[no-untyped-call]
        self._bulk: BulkServer | None = None
        self._lmcache: LMCachePort | None = None
        self._auth = auth

    @property
    def bulk_port(self) -> int | None:
        """The bound bulk-read port (after `start`); None when it is off."""
        return None if self._bulk is None else self._bulk.port

    @property
    def lmcache_port(self) -> int | None:
        """The bound LMCache port (after `start`); None when it is off."""
        return None if self._lmcache is None else self._lmcache.port

    @property
    def lmcache_address(self) -> str | None:
        """ "host:port" of the LMCache port (after `start`); None when it is off."""
        port = self.lmcache_port
        return None if port is None else f"{self.config.lmcache_host}:{port}"

    def start(self) -> CacheServer:
        self.grpc.start()  # first: its port may be a fixed one that a bulk port 0 could take
        try:
            self._bulk = self._start_bulk()
            self._lmcache = self._start_lmcache()
        except BaseException:
            if self._bulk is not None:
                self._bulk.stop()
            self.grpc.stop(0)
            raise
        log.debug("cache server listening on %s", self.address)
        if not self._auth.enabled:
            log.warning(
                "NO AUTHENTICATION: no token is configured (--token, --tokens-file or "
                "KVFUSE_AUTH_TOKEN), so every client that reaches %s (and the bulk port) is "
                "served unauthenticated, as tenant %r, and can read, overwrite and delete "
                "every object",
                self.address,
                DEFAULT_TENANT,
            )
        return self

    def _start_bulk(self) -> BulkServer | None:
        config = self.config
        if config.bulk_port is None:
            return None
        try:
            bulk = BulkServer(
                config.host,
                config.bulk_port,
                self.store,
                self._servicer.codecs,
                config.max_batch_keys,
                self._auth,
                self.metrics,
                server_ssl_context(config.tls_cert, config.tls_key, config.tls_client_ca),
                # mostly idle, kept by clients between reads: cheap threads, so more of them
                max_connections=4 * config.num_workers,
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on bulk port {config.bulk_port}: {exc}") from exc
        bulk.start()
        self._servicer.bulk_port = bulk.port
        return bulk

    def _start_lmcache(self) -> LMCachePort | None:
        config = self.config
        if config.lmcache_port is None:
            return None
        try:
            port = LMCachePort(
                config.lmcache_host,
                config.lmcache_port,
                self.store,
                self.uploads,
                self.metrics,
                max_object_bytes=config.max_object_bytes,
                max_connections=config.lmcache_max_connections,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on LMCache port {config.lmcache_host}:{config.lmcache_port}: {exc}"
            ) from exc
        port.start()
        if not _is_loopback(config.lmcache_host):
            log.warning(
                "LMCache port %s:%d has no authentication: every client that reaches it can "
                "read and overwrite every LMCache object (restrict it with a NetworkPolicy)",
                config.lmcache_host,
                port.port,
            )
        return port

    def close(self) -> None:
        if self._lmcache is not None:
            self._lmcache.stop()
        if self._bulk is not None:
            self._bulk.stop()
        try:
            self._drain()
        finally:
            self.store.close()

    def _drain(self) -> None:
        """Copies what only the memory tier holds into the next tier, for up to `drain_s`
        (gRPC and the bulk port are already closed: nothing changes the store meanwhile)."""
        if self.config.drain_s <= 0 or len(self.store.tiers) < 2:
            return
        start = time.monotonic()
        report = self.store.drain(start + self.config.drain_s)
        seconds = time.monotonic() - start
        below = "+".join(tier.name for tier in self.store.tiers[1:])
        if report.num_left:
            log.warning(
                "shutdown drain: %d objects copied from memory to %s in %.1f s, %d already "
                "there, %d lost (no room below, or past drain_s=%g)",
                report.num_copied, below, seconds, report.num_present, report.num_left,
                self.config.drain_s,
            )  # fmt: skip
        else:
            log.info(
                "shutdown drain: %d objects copied from memory to %s in %.1f s, %d already there",
                report.num_copied, below, seconds, report.num_present,
            )  # fmt: skip


def _is_loopback(host: str) -> bool:
    """Whether a listen address only this machine reaches (localhost or a loopback IP)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
