"""The embedded engine: the library face of kvfuse. It runs the same prefill pipeline as the
prefill worker, over an in-process chunk store, then decodes in the same process:

    from kvfuse import Engine
    eng = Engine.from_pretrained()
    out = eng.generate(segments=[system, doc1, doc2, question], mode="blend", max_tokens=32)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvfuse.blend.config import BlendConfig, Mode
from kvfuse.blend.plan import PlannedPrefill
from kvfuse.blend.precompute import ChunkContext
from kvfuse.blend.run import FusedLayer
from kvfuse.chunk_store import ChunkStore
from kvfuse.decode.step import KVCache, generate_tokens, score_continuation
from kvfuse.errors import InvalidRequestError
from kvfuse.keys import KeySpace, PreparedPrompt
from kvfuse.model.loader import LoadedModel, load_configured
from kvfuse.model.sampling import Sampler, SamplingParams
from kvfuse.prefill.compute import PrefillCompute
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.pipeline import PipelineOptions, Prefilled, PrefillPipeline
from kvfuse.prefill.sources import Shards, StoreSource
from kvfuse.prefill.types import (
    Cancel,
    MissPolicy,
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    WarmResult,
)
from kvfuse.prefill.warm import Warmer
from kvfuse.prefill.writeback import JobWriter, WriteNow
from kvfuse.segments import PromptSegments, build_prompt
from kvfuse.settings import Settings

__all__ = ["Engine", "GenerateOutput"]


@dataclass(frozen=True)
class GenerateOutput:
    """One completion, how long it took, and what its prefill reused (`stats`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    mode: Mode
    total_s: float
    stats: PrefillStats

    @property
    def ttft_s(self) -> float:
        return self.stats.prefill_s


class Engine:
    """Model + tokenizer + in-process chunk store; one request computes at a time. Missing
    objects (`miss_policy`) are stored before `generate` (or the `prefill` iterator) ends."""

    def __init__(
        self,
        loaded: LoadedModel,
        store: ChunkStore,
        chunk_context: ChunkContext = ChunkContext.PREFIX,
        blend: BlendConfig | None = None,
        tenant_salt: str = "",
        miss_policy: MissPolicy = MissPolicy.FORCED,
    ) -> None:
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.store = store
        fingerprints = (loaded.fingerprint, loaded.tokenizer.fingerprint)
        keys = KeySpace(*fingerprints, ChunkContext(chunk_context), tenant_salt)
        self.compute = PrefillCompute(self.model, keys, blend, self.tokenizer.bos_token_id)
        self.lock = threading.RLock()  # held across prefill and decode; the pipeline re-enters
        shards = Shards([StoreSource(store)], ["local"])
        observer = PrefillObserver()
        writer = WriteNow(JobWriter(self.compute, shards.put, self.lock, observer))
        options = PipelineOptions(miss_policy=MissPolicy(miss_policy))
        self.pipeline = PrefillPipeline(self.compute, shards, writer, self.lock, options)
        self.warmer = Warmer(self.compute, shards, self.lock, observer)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        settings: Settings | None = None,
        chunk_context: ChunkContext | str = ChunkContext.PREFIX,
        blend: BlendConfig | None = None,
        miss_policy: MissPolicy | str = MissPolicy.FORCED,
        **overrides: Any,
    ) -> Engine:
        """Loads a model (default: bundled SmolLM2-135M-Instruct) with an in-process store.

        `overrides` are Settings fields (device, dtype, cache_dir, store_capacity_bytes).
        """
        settings = settings or Settings.from_env(model=str(model) if model else None, **overrides)
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        loaded = load_configured(settings)
        store, policy = ChunkStore(settings.store_capacity_bytes), MissPolicy(miss_policy)
        return cls(loaded, store, ChunkContext(chunk_context), blend, miss_policy=policy)

    def prepare(self, segments: Sequence[str], chat: bool = True) -> PreparedPrompt:
        """Tokenizes segments and derives their keys."""
        return self.compute.prepare(build_prompt(self.tokenizer, segments, chat))

    @property
    def miss_policy(self) -> MissPolicy:
        return self.pipeline.options.miss_policy

    @miss_policy.setter
    def miss_policy(self, policy: MissPolicy) -> None:
        self.pipeline.options = replace(self.pipeline.options, miss_policy=MissPolicy(policy))

    def plan(self, prompt: PreparedPrompt, mode: Mode, blend: BlendConfig) -> PlannedPrefill:
        """The row plan of `prompt` over what the store holds now (no precomputed misses)."""
        return self.compute.plan(prompt, mode, blend, self.store.get)

    def warm(self, prompt: PreparedPrompt) -> int:
        """Stores the prompt's prefix and chunks missing from the store; returns how many."""
        return self.warm_chunks(prompt.segments).num_stored

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        """The in-process `ChunkWarmer` (`kvfuse.prefill.warm.Warmer`)."""
        return self.warmer.warm_chunks(segments, request_id)

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[FusedLayer | PrefillResult]:
        """The in-process `Prefiller`: fused layers in order, then the first token and stats.

        Runs on the caller's thread under the engine lock; `prefill_s` counts from the call,
        waiting for the lock included. After the result it stores the prompt's missing
        objects (for the next request), so iterate it to the end.
        """
        for item in self.pipeline.run(request, cancel=cancel):
            yield item.result(request) if isinstance(item, Prefilled) else item

    @torch.inference_mode()
    def generate(
        self,
        segments: Sequence[str],
        mode: Mode | str = Mode.BLEND,
        recompute_ratio: float | None = None,
        max_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = True,
        store_misses: bool = True,
        blend: BlendConfig | None = None,
    ) -> GenerateOutput:
        """Prefills `segments` in `mode` and decodes up to `max_tokens` tokens; with
        `store_misses`, the prompt's missing objects are stored before decoding.

        Raises:
            InvalidRequestError: empty segments, unknown mode, ratio outside [0, 1], and so on.
            PromptTooLongError: prompt + max_tokens exceed the model's context.
        """
        start, mode = time.perf_counter(), Mode.parse(mode)
        sampler = Sampler(SamplingParams(max_tokens, temperature, top_p, seed))
        with self.lock:
            prompt = build_prompt(self.tokenizer, segments, chat)
            request = PrefillRequest("", prompt, mode, recompute_ratio, sampler.params)
            cache, prefilled = self._prefill(request, blend, store_misses)
            first, stop_ids = sampler.sample(prefilled.logits), set(self.tokenizer.eos_token_ids)
            token_ids = list(generate_tokens(self.model, cache, first, sampler, stop_ids))
        finish = "length" if len(token_ids) >= max_tokens else "stop"
        text, total_s = self.tokenizer.decode(token_ids), time.perf_counter() - start
        return GenerateOutput(text, token_ids, finish, mode, total_s, prefilled.stats)

    @torch.inference_mode()
    def score(
        self,
        segments: Sequence[str],
        continuation: Sequence[int],
        mode: Mode | str = Mode.BLEND,
        recompute_ratio: float | None = None,
        *,
        chat: bool = True,
        blend: BlendConfig | None = None,
    ) -> Tensor:
        """Next-token log-probabilities along `continuation` after the prompt prefilled in
        `mode` (teacher forcing): row i is the distribution after continuation[:i]. Misses are
        computed, never stored. Shape: -> [len(continuation), vocab] fp32.

        Raises:
            InvalidRequestError: as `generate`, or an empty continuation.
        """
        if not continuation:
            raise InvalidRequestError("score needs a non-empty continuation")
        params = SamplingParams(max_tokens=len(continuation))
        with self.lock:
            prompt = build_prompt(self.tokenizer, segments, chat)
            request = PrefillRequest("", prompt, Mode.parse(mode), recompute_ratio, params)
            cache, prefilled = self._prefill(request, blend, store=False)
            return score_continuation(self.model, cache, prefilled.logits, list(continuation))

    def _prefill(
        self, request: PrefillRequest, blend: BlendConfig | None, store: bool
    ) -> tuple[KVCache, Prefilled]:
        """The prompt's KV in a cache with room for `max_tokens` more, and its logits."""
        cache = KVCache(self.model, request.segments.num_tokens + request.sampling.max_tokens)
        return cache, cache.fill_from(self.pipeline.run(request, blend, store))
