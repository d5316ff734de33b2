"""Fixtures of the connector's tests inside vLLM's venv: the model view vLLM loads, a real
cache server on 127.0.0.1, a vLLM scheduler with KVFuseConnector loaded by module path."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.structured_output import StructuredOutputManager

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer

BLOCK_SIZE = 16
NUM_BLOCKS = 64
MODEL_ID = "test-model"  # what block keys are scoped to (`model_id` in the extra config)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The safetensors view of the bundled model (made by the calling test in the project's
    venv, which passes it here)."""
    return Path(os.environ["KVFUSE_VLLM_MODEL_DIR"])


@pytest.fixture
def cache_address() -> Iterator[str]:
    settings = {"port": 0, "metrics_port": None, "memory_bytes": "256MiB", "grace_s": 0}
    with CacheServer(CacheServerConfig.from_mapping(settings)) as server:
        yield server.address


MakeScheduler = Callable[..., Scheduler]


@pytest.fixture
def make_scheduler(model_dir: Path) -> MakeScheduler:
    """vLLM's own scheduler over a local model config, KVFuseConnector loaded through
    `kv_connector_module_path` with `extra` as its extra config."""

    def make(extra: dict[str, Any], prefix_caching: bool = False) -> Scheduler:
        config = VllmConfig(
            model_config=ModelConfig(model=str(model_dir), dtype="float32", max_model_len=2048),
            cache_config=CacheConfig(
                block_size=BLOCK_SIZE, cache_dtype="auto", enable_prefix_caching=prefix_caching
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=8,
                max_num_batched_tokens=1024,
                max_model_len=2048,
                is_encoder_decoder=False,
            ),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVFuseConnector",
                kv_connector_module_path="kvfuse.connector.vllm_connector",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={"model_id": MODEL_ID, **extra},
            ),
            device_config=DeviceConfig("cpu"),
        )
        config.cache_config.num_gpu_blocks = NUM_BLOCKS
        spec = FullAttentionSpec(
            block_size=BLOCK_SIZE, num_kv_heads=3, head_size=64, dtype=torch.float32
        )
        kv_cache_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], spec)],
        )
        return Scheduler(
            vllm_config=config,
            kv_cache_config=kv_cache_config,
            structured_output_manager=StructuredOutputManager(config),
            block_size=BLOCK_SIZE,
            log_stats=False,
        )

    return make
