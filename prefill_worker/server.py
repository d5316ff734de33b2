"""The prefill-worker process: engine, chunk sources, write-behind, gRPC server, metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent import futures
from types import TracebackType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.errors import ConfigError
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import load_model
from kvfuse.precompute import ChunkContext
from kvfuse.settings import Settings
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_worker.auth import AuthInterceptor
from prefill_worker.config import PrefillConfig
from prefill_worker.metrics import MetricsServer, PrefillMetrics
from prefill_worker.pipeline import RemotePrefiller
from prefill_worker.servicer import PrefillServicer
from prefill_worker.sources import ChunkSource, LocalSource, RemoteSource, Shards
from prefill_worker.writeback import WriteBehind

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name


def build_engine(config: PrefillConfig) -> Engine:
    """Loads the model once; the engine's own store is the local source (no cache servers)."""
    settings = Settings.from_env(
        model=config.model,
        device=config.device,
        dtype=config.dtype,
        store_capacity_bytes=config.local_store_bytes,
    )
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    loaded = load_model(settings.model, settings.cache_dir, settings.torch_dtype, settings.device)
    store = ChunkStore(config.local_store_bytes)
    return Engine(loaded, store, ChunkContext(config.chunk_context), tenant_salt=config.tenant_salt)


def build_shards(config: PrefillConfig, engine: Engine) -> Shards:
    """One RemoteSource per configured cache server, else the engine's in-process store."""
    if not config.cache_addrs:
        return Shards([LocalSource(engine.store)], ["local"])
    sources: list[ChunkSource] = [
        RemoteSource(
            addr,
            config.effective_cache_token,
            config.lookup_deadline_s,
            config.fetch_deadline_s,
            config.put_deadline_s,
            config.max_message_bytes,
            config.cache_tls_ca,
        )
        for addr in config.cache_addrs
    ]
    return Shards(sources, config.cache_addrs)


def _server_credentials(config: PrefillConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from exc
    return grpc.ssl_server_credentials([pair])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class PrefillServer:
    """A prefill worker: start it, call `port`, stop it (or use it as a context manager).

    Args:
        config: the process settings.
        engine: a loaded engine to share (tests); None loads the configured model.
        sources: chunk sources to use instead of the configured ones (tests).
    """

    def __init__(
        self,
        config: PrefillConfig,
        engine: Engine | None = None,
        sources: Sequence[ChunkSource] | None = None,
    ) -> None:
        self.config = config
        self.engine = engine if engine is not None else build_engine(config)
        self.shards = (
            build_shards(config, self.engine)
            if sources is None
            else Shards(sources, [f"source-{i}" for i in range(len(sources))])
        )
        self.metrics = PrefillMetrics()
        compute_lock = threading.Lock()
        self.writer = WriteBehind(
            self.engine, self._store, config.write_behind_size, compute_lock, self.metrics
        )
        self.prefiller = RemotePrefiller(
            self.engine,
            self.shards,
            self.writer,
            self.metrics,
            compute_lock,
            config.fetch_deadline_s,
            config.default_ratio,
        )
        self._health = health.HealthServicer()
        interceptors = []
        if config.auth_token:
            deny = self.metrics.requests.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc
            interceptors.append(AuthInterceptor(config.auth_token, deny))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(config.num_workers, thread_name_prefix="kvfuse-prefill"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=4 * config.num_workers,
        )
        servicer = PrefillServicer(self.prefiller, self.metrics)
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, self._server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = 0
        self._metrics_server: MetricsServer | None = None
        self._stopped = False

    def _store(self, key: str, kv: ChunkKV) -> bool:
        return self.shards.sources[self.shards.owner(key)].put(key, kv)

    @property
    def address(self) -> str:
        """host:port clients connect to (valid after `start`)."""
        return _address(self.config.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.port

    def start(self) -> PrefillServer:
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
        log.info("prefill worker listening on %s", self.address)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Stops taking RPCs, waits up to `grace_s` (default: config) for in-flight ones, then
        stops the write-behind and the metrics endpoint. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._health.enter_graceful_shutdown()
        grace = self.config.grace_s if grace_s is None else grace_s
        self._server.stop(grace).wait()
        self.writer.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
            self._metrics_server = None
        for source in self.shards.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (or `timeout_s` passes); True if it stopped."""
        return bool(self._server.wait_for_termination(timeout_s))

    def __enter__(self) -> PrefillServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
