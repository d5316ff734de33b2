"""The prefill-worker process: engine, chunk sources, write-behind, gRPC server, metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc
import torch

from kvfuse.blend.precompute import ChunkContext
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import load_model
from kvfuse.service.auth import DEFAULT_TENANT, Authenticator, AuthInterceptor
from kvfuse.service.grpc_server import GrpcServer, GrpcService, PreEncodedInterceptor
from kvfuse.service.threads import on_temporary_thread
from kvfuse.settings import Settings
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_worker.config import PrefillConfig
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.pipeline import RemotePrefiller
from prefill_worker.servicer import PrefillServicer
from prefill_worker.sources import ChunkSource, LocalSource, RemoteSource, Shards
from prefill_worker.warm import Warmer
from prefill_worker.writeback import WriteBehind

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"


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
    return Engine(
        loaded,
        store,
        ChunkContext(config.chunk_context),
        tenant_salt=config.tenant_salt,
        miss_policy=config.miss_policy,
    )


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


class PrefillServer(GrpcService):
    """A prefill worker: start it, call `port`, stop it (or use it as a context manager).

    Args:
        config: the process settings.
        engine: a loaded engine to share (tests; its miss policy is used); None loads the
            configured model.
        sources: chunk sources to use instead of the configured ones (tests).
    """

    def __init__(
        self,
        config: PrefillConfig,
        engine: Engine | None = None,
        sources: Sequence[ChunkSource] | None = None,
    ) -> None:
        self.config = config
        if engine is None:  # loaded on a thread of its own: see kvfuse/service/threads.py
            engine = on_temporary_thread(lambda: build_engine(config))
        self.engine = engine
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
            pipeline=config.pipeline,
            num_threads=config.num_threads,
        )
        tokens = {config.auth_token: DEFAULT_TENANT} if config.auth_token else {}
        deny = self.metrics.requests.labels(grpc.StatusCode.UNAUTHENTICATED.name).inc
        grpc_server = GrpcServer(
            SERVICE_NAME,
            host=config.host,
            port=config.port,
            num_workers=config.num_workers,
            max_message_bytes=config.max_message_bytes,
            thread_name_prefix="kvfuse-prefill",
            interceptors=[
                AuthInterceptor(Authenticator(tokens), SERVICE_PREFIX, deny),
                PreEncodedInterceptor([f"{SERVICE_PREFIX}Prefill"]),  # layer frames are bytes
            ],
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            metrics_registry=self.metrics.registry,
            metrics_port=config.metrics_port,
        )
        super().__init__(grpc_server, config.grace_s)
        self.warmer = Warmer(self.engine, self.shards, compute_lock, self.metrics)
        servicer = PrefillServicer(self.prefiller, self.warmer, self.metrics)
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, grpc_server.server)  # type: ignore[no-untyped-call]

    def _store(self, key: str, kv: ChunkKV) -> bool:
        return self.shards.sources[self.shards.owner(key)].put(key, kv)

    def start(self) -> PrefillServer:
        self.grpc.start()
        log.info("prefill worker listening on %s", self.address)
        return self

    def close(self) -> None:
        """Stops the write-behind and closes the chunk sources."""
        self.writer.close()
        for source in self.shards.sources:
            close = getattr(source, "close", None)
            if close is not None:
                close()
