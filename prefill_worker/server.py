"""The prefill-worker process: the prefill pipeline over cache shards, its write-behind and
warmer, served over gRPC with metrics."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import grpc
import torch

from kvfuse.blend.precompute import ChunkContext
from kvfuse.chunk_store import ChunkStore
from kvfuse.client.controller import ControllerClient
from kvfuse.control.policy import WorkerPolicy
from kvfuse.keys import KeySpace
from kvfuse.model.loader import load_configured
from kvfuse.prefill.compute import PrefillCompute
from kvfuse.prefill.handoff import HandoffBoard
from kvfuse.prefill.pipeline import PipelineOptions, PrefillPipeline
from kvfuse.prefill.sources import (
    CacheServerSource,
    ChunkSource,
    Shards,
    StoreSource,
    shard_name,
)
from kvfuse.prefill.warm import Warmer
from kvfuse.prefill.writeback import WriteBehind
from kvfuse.service.auth import DEFAULT_TENANT, Authenticator, AuthInterceptor
from kvfuse.service.grpc_server import GrpcServer, GrpcService, PreEncodedInterceptor
from kvfuse.service.threads import on_temporary_thread
from kvfuse.settings import Settings
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_worker.config import PrefillConfig
from prefill_worker.controller_link import ControllerLink
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.servicer import PrefillServicer
from prefill_worker.shard_switch import ShardSwitch

log = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["PrefillService"].full_name
SERVICE_PREFIX = f"/{SERVICE_NAME}/"


def build_compute(config: PrefillConfig) -> PrefillCompute:
    """Loads the model once and wraps it with the configured key space."""
    settings = Settings.from_env(model=config.model, device=config.device, dtype=config.dtype)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    loaded = load_configured(settings)
    fingerprints = (loaded.fingerprint, loaded.tokenizer.fingerprint)
    keys = KeySpace(*fingerprints, ChunkContext(config.chunk_context), config.tenant_salt)
    return PrefillCompute(loaded.model, keys, bos_token_id=loaded.tokenizer.bos_token_id)


def cache_source(config: PrefillConfig, addr: str) -> CacheServerSource:
    """A cache server at `addr` with the configured deadlines, token and TLS."""
    return CacheServerSource(
        addr,
        config.effective_cache_token,
        config.lookup_deadline_s,
        config.fetch_deadline_s,
        config.put_deadline_s,
        config.max_message_bytes,
        config.cache_tls_ca,
    )


def build_shards(config: PrefillConfig) -> Shards:
    """One CacheServerSource per configured cache server, else an in-process store."""
    if not config.cache_addrs:
        return Shards([StoreSource(ChunkStore(config.local_store_bytes))], ["local"])
    sources: list[ChunkSource] = [cache_source(config, addr) for addr in config.cache_addrs]
    return Shards(sources, [shard_name(addr) for addr in config.cache_addrs])


class PrefillServer(GrpcService):
    """A prefill worker: start it, call `port`, stop it (or use it as a context manager).

    Args:
        config: the process settings.
        compute: a loaded model with its key space to share (tests); None loads the
            configured model.
        sources: chunk sources to use instead of the configured ones (tests).
    """

    def __init__(
        self,
        config: PrefillConfig,
        compute: PrefillCompute | None = None,
        sources: Sequence[ChunkSource] | None = None,
    ) -> None:
        self.config = config
        if compute is None:  # loaded on a thread of its own: see kvfuse/service/threads.py
            compute = on_temporary_thread(lambda: build_compute(config))
        self.compute = compute
        self.shards = (
            build_shards(config)
            if sources is None
            else Shards(sources, [f"source-{i}" for i in range(len(sources))])
        )
        self.metrics = PrefillMetrics()
        compute_lock = threading.Lock()
        self.writer = WriteBehind(
            compute,
            lambda key, kv: self.pipeline.shards.put(key, kv),  # the shards in use now
            config.write_behind_size,
            compute_lock,
            self.metrics,
        )
        options = PipelineOptions(
            miss_policy=config.miss_policy,
            fetch_deadline_s=config.fetch_deadline_s,
            default_ratio=config.default_ratio,
            wait_for_hits=not config.pipeline,
            max_chunks=config.max_chunks,
            num_threads=config.num_threads,
        )
        self.pipeline = PrefillPipeline(
            compute, self.shards, self.writer, compute_lock, options, self.metrics
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
                # layer frames are bytes
                PreEncodedInterceptor([f"{SERVICE_PREFIX}Prefill", f"{SERVICE_PREFIX}TakeFused"]),
            ],
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            metrics_registry=self.metrics.registry,
            metrics_port=config.metrics_port,
        )
        super().__init__(grpc_server, config.grace_s)
        self.warmer = Warmer(compute, self.shards, compute_lock, self.metrics)
        self.handoffs = HandoffBoard(config.handoff_bytes, config.handoff_ttl_s)
        servicer = PrefillServicer(
            self.pipeline, self.warmer, self.metrics, self.handoffs, self._advertised_address
        )
        prefill_pb2_grpc.add_PrefillServiceServicer_to_server(servicer, grpc_server.server)  # type: ignore[no-untyped-call]
        linger_s = config.fetch_deadline_s + config.put_deadline_s
        self.shard_switch = ShardSwitch(
            self.shards, lambda addr: cache_source(config, addr), self._install, linger_s
        )
        self.link: ControllerLink | None = None

    def _advertised_address(self) -> str:
        return self.config.advertise_address or self.address

    def _install(self, shards: Shards) -> None:
        """New shards for requests, warm calls and stores from now on."""
        self.pipeline.shards = self.warmer.shards = shards

    def apply_policy(self, policy: WorkerPolicy) -> None:
        """The controller's policy: its ratio policy per request, its cache servers."""
        self.pipeline.policy = policy.ratio
        self.shard_switch.update(policy.cache_servers)
        self.metrics.policy_applied(policy)

    def _start_link(self) -> None:
        config = self.config
        if config.controller is None:
            return
        client = ControllerClient(
            config.controller,
            token=config.effective_controller_token,
            tls_root_cert=config.controller_tls_ca,
        )
        member_id = config.member_id or self.address
        self.link = ControllerLink(client, member_id, self.apply_policy, config.report_interval_s)
        self.metrics.link = self.link
        self.link.start()

    def start(self) -> PrefillServer:
        self.grpc.start()
        self._start_link()
        log.info("prefill worker listening on %s", self.address)
        return self

    def close(self) -> None:
        """Stops the controller link and the write-behind, closes the chunk sources."""
        if self.link is not None:
            self.link.close()
        self.writer.close()
        self.pipeline.shards.close()
