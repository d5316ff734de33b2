"""The decode worker's parts wired together: model, prompt builder, engine, metrics, prefill."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from decode_worker.admission import Admission
from decode_worker.config import DecodeConfig
from decode_worker.errors import ModelNotFoundError
from decode_worker.intake import Intake
from decode_worker.limits import RequestLimits
from decode_worker.metrics import DecodeMetrics
from decode_worker.prefiller import PrefillBackend, local_backend, remote_backend
from decode_worker.prompts import PromptBuilder, PromptDefaults
from decode_worker.scheduler import Scheduler, SchedulerLimits
from decode_worker.served_model import ServedModel, load_without_weights
from decode_worker.vllm_client import VllmClient
from decode_worker.vllm_engine import VllmEngine
from kvfuse.blend import Mode
from kvfuse.blend.precompute import ChunkContext
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine as LocalEngine
from kvfuse.errors import ConfigError
from kvfuse.model.loader import LoadedModel, load_configured
from kvfuse.prefill import WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.service.threads import io_thread, on_temporary_thread

log = logging.getLogger(__name__)


class DecodeService:
    """What the HTTP routes call. Lifecycle: construct, `start`, serve, `stop`, `aclose`.

    Attributes:
        max_model_len: prompt + generation limit: the model's context, the configured limit,
            what the KV budget holds and vLLM's context (engine vllm), whichever is least.
        limits: what one request may ask (`decode_worker.limits`).
        intake: request bodies → requests, off the event loop.
        engine: what decodes: the embedded `Scheduler`, or a `VllmEngine` when `vllm` is given.
    """

    def __init__(
        self,
        config: DecodeConfig,
        model: LoadedModel | ServedModel,
        backend: PrefillBackend,
        vllm: VllmClient | None = None,
    ) -> None:
        served = model if isinstance(model, ServedModel) else ServedModel.of(model)
        self.config, self.backend, self.vllm = config, backend, vllm
        self.model_name = config.model_name
        self.tokenizer, self.root = served.tokenizer, served.source
        self.created = int(time.time())
        cfg = served.cfg
        kv_budget_tokens = config.kv_cache_bytes // served.kv_bytes_per_token
        self.max_model_len = min(
            cfg.max_position_embeddings,
            config.max_model_len or cfg.max_position_embeddings,
            kv_budget_tokens,
            vllm.max_model_len if vllm is not None else kv_budget_tokens,
        )
        self.metrics = DecodeMetrics(self.model_name)
        self.engine: Scheduler | VllmEngine = (
            self._scheduler(served, kv_budget_tokens)
            if vllm is None
            else self._vllm_engine(vllm, kv_budget_tokens)
        )
        self.metrics.bind(self.engine)
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
        self.prompts = PromptBuilder(served.tokenizer, defaults, self.limits)
        self.intake = Intake(self.prompts, self.limits, self.check_model, config.prepare_threads)

    def _scheduler(self, served: ServedModel, kv_budget_tokens: int) -> Scheduler:
        config, backend, loaded = self.config, self.backend, served.loaded
        if loaded is None:
            raise ConfigError("the embedded decoder needs the model's weights")
        limits = SchedulerLimits(
            config.max_batch, kv_budget_tokens, config.max_concurrent_prefills, config.max_waiting
        )
        return Scheduler(
            loaded.model,
            loaded.tokenizer,
            backend.prefiller,
            limits,
            self.metrics,
            backend.remote,
            config.num_threads,
            backend.shares_cores,
        )

    def _vllm_engine(self, vllm: VllmClient, kv_budget_tokens: int) -> VllmEngine:
        hand_off = self.backend.hand_off
        if hand_off is None:
            raise ConfigError("engine vllm needs a remote prefill worker (prefill_url)")
        config = self.config
        admission = Admission(config.max_batch, kv_budget_tokens, config.max_waiting)
        eos_token_ids = self.tokenizer.eos_token_ids
        return VllmEngine(
            vllm, hand_off, admission, self.metrics, eos_token_ids, config.handoff_timeout_s
        )

    @classmethod
    def from_config(cls, config: DecodeConfig) -> DecodeService:
        """Loads the model (and, for local prefill, an engine with its chunk store); with
        engine vllm, only the model's config and tokenizer, once vLLM answers.

        Raises:
            ServiceUnavailableError: engine vllm, and vLLM did not answer in `vllm_timeout_s`.
        """
        settings = config.engine_settings()
        if config.engine == "vllm":
            vllm = VllmClient.connect(config.vllm_url, config.vllm_model, config.vllm_timeout_s)
            log.info("decode worker: model %s, engine vLLM %s", config.model_name, vllm.url)
            return cls(config, load_without_weights(settings), _remote(config), vllm)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        loaded = on_temporary_thread(  # its torch team must not outlive it: service/threads.py
            lambda: load_configured(settings)
        )
        if config.prefill_url:
            backend = _remote(config)
        else:
            store = ChunkStore(config.store_capacity_bytes)
            context = ChunkContext(config.chunk_context)
            engine = LocalEngine(loaded, store, context, miss_policy=config.miss_policy)
            backend = local_backend(engine)
        log.info("decode worker: model %s, prefill %s", config.model_name, backend.name)
        return cls(config, loaded, backend)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()
        self.backend.close()

    async def aclose(self) -> None:
        """After `stop`, on the serving loop: lets vLLM requests end, closes the vLLM client."""
        if isinstance(self.engine, VllmEngine):
            await self.engine.aclose()

    def health(self) -> str | None:
        """None when requests can be served, else why not. Blocks on a remote probe. With
        engine vllm, a prefill worker that is down only makes vLLM compute prompts itself."""
        if self.vllm is not None:
            healthy = self.engine.is_alive and self.vllm.healthy()
            return None if healthy else f"vLLM at {self.vllm.url} is not healthy"
        ready = self.engine.is_alive and self.backend.ready()
        return None if ready else "the prefill worker is not ready"

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


def _remote(config: DecodeConfig) -> PrefillBackend:
    return remote_backend(
        config.prefill_url, config.effective_prefill_token, config.prefill_timeout_s
    )
