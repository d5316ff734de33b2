"""The decode worker's parts wired together: model, prompt builder, scheduler, metrics, prefill."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from decode_worker.config import DecodeConfig
from decode_worker.errors import ModelNotFoundError
from decode_worker.intake import Intake
from decode_worker.limits import RequestLimits
from decode_worker.metrics import DecodeMetrics
from decode_worker.prefiller import PrefillBackend, local_backend, remote_backend
from decode_worker.prompts import PromptBuilder, PromptDefaults
from decode_worker.scheduler import Scheduler, SchedulerLimits
from kvfuse.blend import Mode
from kvfuse.blend.precompute import ChunkContext
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.model.loader import LoadedModel, load_configured
from kvfuse.prefill import WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.service.threads import io_thread, on_temporary_thread

log = logging.getLogger(__name__)


class DecodeService:
    """What the HTTP routes call. Lifecycle: construct, `start`, serve, `stop`.

    Attributes:
        max_model_len: prompt + generation limit: the model's context, the configured limit
            and what the KV budget holds, whichever is least.
        limits: what one request may ask (`decode_worker.limits`).
        intake: request bodies → requests, off the event loop.
    """

    def __init__(self, config: DecodeConfig, loaded: LoadedModel, backend: PrefillBackend) -> None:
        self.config, self.backend = config, backend
        self.model_name = config.model_name
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.root = loaded.source
        self.created = int(time.time())
        cfg = loaded.model.cfg
        kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        kv_bytes_per_token *= loaded.model.dtype.itemsize
        kv_budget_tokens = config.kv_cache_bytes // kv_bytes_per_token
        self.max_model_len = min(
            cfg.max_position_embeddings,
            config.max_model_len or cfg.max_position_embeddings,
            kv_budget_tokens,
        )
        self.metrics = DecodeMetrics(self.model_name)
        limits = SchedulerLimits(
            config.max_batch, kv_budget_tokens, config.max_concurrent_prefills, config.max_waiting
        )
        self.scheduler = Scheduler(
            loaded.model,
            loaded.tokenizer,
            backend.prefiller,
            limits,
            self.metrics,
            backend.remote,
            config.num_threads,
            backend.shares_cores,
        )
        self.metrics.bind(self.scheduler)
        defaults = PromptDefaults(
            separator=config.separator,
            max_model_len=self.max_model_len,
            default_max_tokens=config.default_max_tokens,
            default_temperature=config.default_temperature,
            default_mode=Mode(config.default_mode),
            default_recompute_ratio=config.default_recompute_ratio,
            vocab_size=cfg.vocab_size,
        )
        self.limits = RequestLimits.from_config(config, self.max_model_len)
        self.prompts = PromptBuilder(loaded.tokenizer, defaults, self.limits)
        self.intake = Intake(self.prompts, self.limits, self.check_model, config.prepare_threads)

    @classmethod
    def from_config(cls, config: DecodeConfig) -> DecodeService:
        """Loads the model (and, for local prefill, an engine with its chunk store)."""
        settings = config.engine_settings()
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        loaded = on_temporary_thread(  # its torch team must not outlive it: service/threads.py
            lambda: load_configured(settings)
        )
        if config.prefill_url:
            backend = remote_backend(
                config.prefill_url, config.effective_prefill_token, config.prefill_timeout_s
            )
        else:
            store = ChunkStore(config.store_capacity_bytes)
            context = ChunkContext(config.chunk_context)
            engine = Engine(loaded, store, context, miss_policy=config.miss_policy)
            backend = local_backend(engine)
        log.info("decode worker: model %s, prefill %s", config.model_name, backend.name)
        return cls(config, loaded, backend)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.backend.close()

    def ready(self) -> bool:
        """Whether requests can be served: the decode thread runs and the prefiller answers."""
        return self.scheduler.is_alive and self.backend.ready()

    def warm(self, segments: PromptSegments, request_id: str) -> WarmResult:
        """Stores the segments' prefix and chunks through the prefill backend; blocks until
        done. A local engine computes on a thread of its own at I/O priority, so requests
        keep the cores (kvfuse/service/threads.py)."""

        def run() -> WarmResult:
            io_thread()
            return self.backend.warmer.warm_chunks(segments, request_id)

        return on_temporary_thread(run)

    def check_model(self, name: str | None) -> None:
        """Raises ModelNotFoundError unless `name` is the served model (None means it)."""
        if name is not None and name != self.model_name:
            raise ModelNotFoundError(f"The model `{name}` does not exist.")

    def models(self) -> dict[str, Any]:
        """The `GET /v1/models` body, in vLLM's shape."""
        card = {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "kvfuse",
            "root": self.root,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}
