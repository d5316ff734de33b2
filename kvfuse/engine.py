"""The embedded engine: tokenize segments, look up chunk KV, blend, decode — in one process.

This is the library face of kvfuse (the services wrap the same steps):

    from kvfuse import Engine
    eng = Engine.from_pretrained()
    out = eng.generate(segments=[system, doc1, doc2, question], mode="blend", max_tokens=32)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvfuse import keys
from kvfuse.blend import BlendConfig, BlendRun, FusedLayer, Mode
from kvfuse.blend.plan import (
    PRECOMPUTE_MODES,
    MissPolicy,
    PlanInputs,
    PlannedPrefill,
    PreparedPrompt,
    plan_prefill,
)
from kvfuse.blend.precompute import ChunkContext, precompute
from kvfuse.chunk_store import ChunkStore
from kvfuse.decode.step import KVCache, generate_tokens, score_continuation
from kvfuse.errors import CacheError, ConfigError, InvalidRequestError, PromptTooLongError
from kvfuse.kv import ChunkKV, ChunkLayers
from kvfuse.model.loader import LoadedModel, load_model
from kvfuse.model.sampling import Sampler, SamplingParams
from kvfuse.prefill import PrefillRequest, PrefillResult, PrefillStats, WarmResult, prefill_stats
from kvfuse.segments import PromptSegments, build_prompt
from kvfuse.settings import Settings
from kvfuse.warm import store_computed, warm_objects, warm_segments

__all__ = [
    "Engine",
    "GenerateOutput",
    "MissPolicy",
    "PlannedPrefill",
    "PreparedPrompt",
    "prefill_stats",
]


@dataclass(frozen=True)
class GenerateOutput:
    """One completion and what its prefill reused."""

    text: str
    token_ids: list[int]
    ttft_s: float
    total_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    num_recomputed_tokens: int
    num_computed_tokens: int
    num_chunks: int
    num_chunk_hits: int
    finish_reason: str
    mode: Mode
    num_precomputed_tokens: int = 0
    num_chunks_precomputed: int = 0


class Engine:
    """Model + tokenizer + chunk store. `generate` is serialized by a lock.

    `miss_policy` says how a request handles chunks missing from the store (see
    `kvfuse.blend.plan.MissPolicy`); either way they are stored after the first token.
    """

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
        self.fingerprint = loaded.fingerprint
        self.store = store
        self.chunk_context = ChunkContext(chunk_context)
        self.blend = blend or BlendConfig()
        self.blend.schedule(self.model.cfg.num_layers)  # validates check layers early
        self.tenant_salt = tenant_salt
        self.miss_policy = MissPolicy(miss_policy)
        self._lock = threading.Lock()

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
        loaded = load_model(
            settings.model, settings.cache_dir, settings.torch_dtype, settings.device
        )
        store = ChunkStore(settings.store_capacity_bytes)
        return cls(
            loaded, store, ChunkContext(chunk_context), blend, miss_policy=MissPolicy(miss_policy)
        )

    @property
    def max_context_tokens(self) -> int:
        return self.model.cfg.max_position_embeddings

    def prepare(self, segments: Sequence[str], chat: bool = True) -> PreparedPrompt:
        """Tokenizes segments and derives their keys."""
        return self.prepare_tokens(build_prompt(self.tokenizer, segments, chat))

    def prepare_tokens(self, seg: PromptSegments) -> PreparedPrompt:
        """Derives the store keys of an already tokenized prompt."""
        root = keys.chunk_key(
            self.fingerprint, self.tokenizer.fingerprint, "prefix-root", self.tenant_salt, []
        )
        prefix_key = keys.prefix_key(root, seg.prefix_ids)
        context_id = self.chunk_context.value
        if self.chunk_context is ChunkContext.PREFIX:
            context_id = f"prefix:{prefix_key}"
        chunk_keys = tuple(
            keys.chunk_key(
                self.fingerprint, self.tokenizer.fingerprint, context_id, self.tenant_salt, ids
            )
            for ids in seg.chunk_ids
        )
        return PreparedPrompt(seg, prefix_key, chunk_keys)

    def warm(self, prompt: PreparedPrompt) -> int:
        """Precomputes and stores the prefix and every chunk not in the store; returns how many."""
        computed = self.compute_missing(prompt, self.store.contains, self.store.get)
        return sum(self.store.put(key, kv) for key, kv in computed)

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        """The in-process `ChunkWarmer`: stores the prompt's missing prefix and chunks, taking
        the engine lock per object (requests run between them). `request_id` is unused.

        Raises:
            InvalidRequestError: no chunk, an empty chunk, a token id outside the vocabulary.
            PromptTooLongError: prefix + a chunk exceed the model's context.
        """
        start = time.perf_counter()
        cfg = self.model.cfg
        prompt = self.prepare_tokens(
            warm_segments(segments, cfg.vocab_size, self.max_context_tokens)
        )
        objects = warm_objects(prompt)
        present = {key for key in objects if self.store.contains(key)}
        computed = self.compute_missing(prompt, present.__contains__, self.store.get)
        stored, failed, num_tokens = store_computed(computed, present, self._lock, self._put)
        elapsed = time.perf_counter() - start
        return WarmResult(len(objects), len(present), stored, failed, num_tokens, elapsed)

    def _put(self, key: str, kv: ChunkKV) -> bool:
        if not self.store.put(key, kv):
            raise CacheError(f"{key[:12]}: larger than the whole in-process store")
        return True

    def compute_missing(
        self,
        prompt: PreparedPrompt,
        contains: Callable[[str], bool],
        get_prefix: Callable[[str], ChunkKV | None],
    ) -> Iterator[tuple[str, ChunkKV]]:
        """Precomputes, in order, the prefix and chunks `contains` says are missing.

        The prefix KV (from `get_prefix`, or computed when that returns None) is the chunk
        context under ChunkContext.PREFIX. `get_prefix` is called only when the prefix is
        missing or is that context for a missing chunk: it may block (a worker waits for a
        streaming prefix to arrive whole), which a prompt with nothing to compute must not do.
        Yields (key, kv) for each computed object; stores nothing.
        """
        seg = prompt.segments
        spans = zip(prompt.chunk_keys, seg.chunk_ids, strict=True)
        missing = [(key, chunk_ids) for key, chunk_ids in spans if not contains(key)]
        needs_context = bool(missing) and self.chunk_context is ChunkContext.PREFIX
        prefix_kv = None
        if seg.prefix_ids and (needs_context or not contains(prompt.prefix_key)):
            prefix_kv = get_prefix(prompt.prefix_key)
            if prefix_kv is None:
                prefix_kv = precompute(self.model, [], None, seg.prefix_ids)
                yield prompt.prefix_key, prefix_kv
        context_ids, context_kv = self._context(seg, prefix_kv)
        for key, chunk_ids in missing:
            yield key, precompute(self.model, context_ids, context_kv, chunk_ids)

    def _context(
        self, seg: PromptSegments, prefix_kv: ChunkKV | None
    ) -> tuple[Sequence[int], ChunkKV | None]:
        if self.chunk_context is ChunkContext.PREFIX:
            return seg.prefix_ids, prefix_kv
        if self.chunk_context is ChunkContext.BOS and self.tokenizer.bos_token_id is not None:
            return [self.tokenizer.bos_token_id], None
        return [], None

    def plan(
        self,
        prompt: PreparedPrompt,
        mode: Mode,
        blend: BlendConfig,
        chunks: Mapping[str, ChunkLayers] | None = None,
        precomputed: Mapping[str, ChunkKV] | None = None,
    ) -> PlannedPrefill:
        """Decides which rows are cached, exact, forced (see `kvfuse.blend.plan.plan_prefill`).

        Args:
            chunks: the cached objects available, by key (prefix and chunks); None looks them
                up in the in-process store. A worker passes chunks still streaming in.
            precomputed: missing objects this request precomputed (`precompute_misses`);
                they are reused like hits but not counted as hits.
        """
        inputs = PlanInputs(
            lookup=self.store.get if chunks is None else chunks.get,
            precomputed=precomputed or {},
            num_layers=self.model.cfg.num_layers,
            inv_freq=self.model.inv_freq,
            exact_first_chunk=self.chunk_context is ChunkContext.PREFIX,
        )
        return plan_prefill(prompt, mode, blend, inputs)

    def precompute_misses(
        self,
        prompt: PreparedPrompt,
        mode: Mode,
        contains: Callable[[str], bool] | None = None,
        get_prefix: Callable[[str], ChunkKV | None] | None = None,
    ) -> dict[str, ChunkKV]:
        """Under `MissPolicy.PRECOMPUTE`, the prompt's missing objects precomputed standalone.

        `contains`/`get_prefix` default to the in-process store (see `compute_missing`).
        Returns {} under `MissPolicy.FORCED` or a mode that does not reuse chunks.
        """
        if self.miss_policy is MissPolicy.FORCED or mode not in PRECOMPUTE_MODES:
            return {}
        contains = contains or self.store.contains
        return dict(self.compute_missing(prompt, contains, get_prefix or self.store.get))

    def store_misses(
        self, prompt: PreparedPrompt, mode: Mode, precomputed: Mapping[str, ChunkKV]
    ) -> int:
        """Stores what the request precomputed, or (`forced`) precomputes and stores the
        prompt's missing objects; returns how many were stored."""
        if self.miss_policy is MissPolicy.PRECOMPUTE and mode in PRECOMPUTE_MODES:
            return sum(self.store.put(key, kv) for key, kv in precomputed.items())
        return self.warm(prompt)

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
        """Prefills `segments` in `mode` and decodes up to `max_tokens` tokens.

        Misses are computed in place (`MissPolicy.FORCED`; with `store_misses` they are then
        precomputed and stored after the answer) or precomputed first and reused
        (`MissPolicy.PRECOMPUTE`; with `store_misses` stored after the answer as they are).

        Raises:
            InvalidRequestError: empty segments, unknown mode, ratio outside [0, 1], and so on.
            PromptTooLongError: prompt + max_tokens exceed the model's context.
        """
        mode = _parse_mode(mode)
        blend = self._blend_config(blend, recompute_ratio)
        params = SamplingParams(max_tokens, temperature, top_p, seed)
        with self._lock:
            start = time.perf_counter()
            prompt = self.prepare(segments, chat)
            planned, run, precomputed = self._begin(prompt, mode, blend, max_tokens)
            cache = KVCache(self.model, prompt.segments.num_tokens + max_tokens)
            cache.fill(run)
            sampler = Sampler(params)
            first = sampler.sample(run.last_logits)
            stats = prefill_stats(run.stats, planned, start)
            stop_ids = set(self.tokenizer.eos_token_ids)
            token_ids = list(generate_tokens(self.model, cache, first, sampler, stop_ids))
            total_s = time.perf_counter() - start
            if store_misses and mode is not Mode.FULL_PREFILL:
                self.store_misses(prompt, mode, precomputed)
        return self._output(token_ids, params, stats, total_s, mode)

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
        mode = _parse_mode(mode)
        blend = self._blend_config(blend, recompute_ratio)
        with self._lock:
            prompt = self.prepare(segments, chat)
            _, run, _ = self._begin(prompt, mode, blend, len(continuation))
            return score_continuation(self.model, run, list(continuation))

    @torch.inference_mode()
    def prefill(
        self, request: PrefillRequest, blend: BlendConfig | None = None
    ) -> Iterator[FusedLayer | PrefillResult]:
        """The in-process `Prefiller`: fused layers in order, then the first token and stats.

        Holds the engine lock while it runs; `prefill_s` counts from the call, waiting for
        the lock included (as the prefill worker counts it). After the result it stores the
        prompt's missing chunks (for the next request), so iterate it to the end.
        """
        start = time.perf_counter()
        blend = self._blend_config(blend, request.recompute_ratio)
        with self._lock:
            prompt = self.prepare_tokens(request.segments)
            max_tokens = request.sampling.max_tokens
            planned, run, precomputed = self._begin(prompt, request.mode, blend, max_tokens)
            yield from run
            first = Sampler(request.sampling).sample(run.last_logits)
            yield PrefillResult(first, prefill_stats(run.stats, planned, start))
            if request.mode is not Mode.FULL_PREFILL:
                self.store_misses(prompt, request.mode, precomputed)

    def _begin(
        self, prompt: PreparedPrompt, mode: Mode, blend: BlendConfig, max_tokens: int
    ) -> tuple[PlannedPrefill, BlendRun, dict[str, ChunkKV]]:
        """Checks the length, precomputes misses (per the policy) and starts the run."""
        num_tokens = prompt.segments.num_tokens
        if num_tokens + max_tokens > self.max_context_tokens:
            raise PromptTooLongError(num_tokens + max_tokens, self.max_context_tokens)
        precomputed = self.precompute_misses(prompt, mode)
        planned, run = self.start_prefill(prompt, mode, blend, precomputed=precomputed)
        return planned, run, precomputed

    def start_prefill(
        self,
        prompt: PreparedPrompt,
        mode: Mode,
        blend: BlendConfig,
        chunks: Mapping[str, ChunkLayers] | None = None,
        precomputed: Mapping[str, ChunkKV] | None = None,
    ) -> tuple[PlannedPrefill, BlendRun]:
        """Plans a prefill and returns its run; iterate the run to compute fused layers.

        Not serialized: callers that share the engine across threads hold their own lock.
        """
        planned = self.plan(prompt, mode, blend, chunks, precomputed)
        run = BlendRun(
            self.model,
            planned.plan,
            planned.cached_kv,
            planned.schedule,
            blend.mask,
            blend.deviation,
        )
        return planned, run

    def blend_config(self, ratio: float | None = None) -> BlendConfig:
        """The engine's blend settings, with `ratio` as the single recompute ratio if given."""
        return self._blend_config(None, ratio)

    def _blend_config(self, blend: BlendConfig | None, ratio: float | None) -> BlendConfig:
        blend = blend or self.blend
        if ratio is None:
            return blend
        try:
            return replace(blend, recompute_ratio=float(ratio), ratios=())
        except ConfigError as e:
            raise InvalidRequestError(str(e)) from e

    def _output(
        self,
        token_ids: list[int],
        params: SamplingParams,
        stats: PrefillStats,
        total_s: float,
        mode: Mode,
    ) -> GenerateOutput:
        finish = "length" if len(token_ids) >= params.max_tokens else "stop"
        return GenerateOutput(
            text=self.tokenizer.decode(token_ids),
            token_ids=token_ids,
            ttft_s=stats.prefill_s,
            total_s=total_s,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_cached_tokens=stats.num_cached_tokens,
            num_recomputed_tokens=stats.num_recomputed_tokens,
            num_computed_tokens=stats.num_computed_tokens,
            num_chunks=stats.num_chunks,
            num_chunk_hits=stats.num_chunk_hits,
            finish_reason=finish,
            mode=mode,
            num_precomputed_tokens=stats.num_precomputed_tokens,
            num_chunks_precomputed=stats.num_chunks_precomputed,
        )


def _parse_mode(mode: Mode | str) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        names = ", ".join(m.value for m in Mode)
        raise InvalidRequestError(f"unknown mode {mode!r} (one of: {names})") from None
