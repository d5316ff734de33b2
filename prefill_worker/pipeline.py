"""The worker's `Prefiller`: look up, stream chunk layers in, blend, stream fused layers out.

One request, in order: validate; derive keys (`engine.prepare_tokens`); look the prefix and
chunks up on their cache shards; start one background `GetLayers` stream per shard with hits;
take the compute lock; under `MissPolicy.PRECOMPUTE` precompute the missing chunks standalone
while the hits keep streaming in; run the blend layer by layer on a compute thread while the
caller reads finished layers (so fetch of layer l+1, compute of layer l and sending of layer
l-1 overlap); sample the first token; queue the missing chunks for write-behind (objects the
request precomputed go with the job, so it only stores them).

With the pipeline off (`pipeline=False`) the request waits for every hit to arrive whole before
it takes the compute lock, and sends its fused layers only once all are computed.

Fail soft: a lookup that fails makes its keys misses (computed in place). A stream that fails
part-way makes its incomplete chunks misses and restarts the blend without them; layers the
caller already received are not sent again — the restarted run's later layers follow them.
Every fused layer is a complete, consistent layer of some valid prefill of this prompt (the
first ones of the blend, the rest of the recompute), and the first token comes from the
recompute. The stats say why (`fallback`), a metric counts it, the request succeeds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import replace

import torch

from kvfuse.blend import BlendConfig, FusedLayer, Mode
from kvfuse.blend.plan import PreparedPrompt
from kvfuse.engine import Engine
from kvfuse.errors import CacheError, InvalidRequestError, KvfuseError, PromptTooLongError
from kvfuse.kv import ChunkKV
from kvfuse.model.sampling import Sampler
from kvfuse.prefill import PrefillRequest, PrefillResult, prefill_stats
from kvfuse.service.threads import ThreadStarter, compute_thread
from kvfuse.transport.prefill_messages import check_request_id
from prefill_worker.background import BackgroundIterator
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.remote_chunks import LayerFetch, Layout, StreamedChunk, fallback_reason
from prefill_worker.request_state import Cancel, Fetched
from prefill_worker.sources import ChunkInfo, Shards
from prefill_worker.writeback import WriteBehind, WriteJob

_LOCK_POLL_S = 0.05  # how often a request waiting for the compute lock checks for cancel


class RemotePrefiller:
    """Prefills prompts with chunk KV from cache shards. Thread-safe.

    Requests compute one at a time under `compute_lock` (also taken by the write-behind per
    chunk); their fetches and the reading of their layers run concurrently.

    Args:
        engine: model, tokenizer, keys; its own store is not used (see `LocalSource`).
        shards: where chunks are looked up, fetched and stored.
        writer: the write-behind queue; None never stores missing chunks.
        fetch_deadline_s: how long a request's layer streams may take in all.
        default_ratio: recompute ratio when a request sets none; None keeps the engine's.
        layers_ahead: fused layers computed ahead of the reader (bounds memory).
        pipeline: False waits for every hit before computing and sends after computing.
        num_threads: torch threads of each request's compute thread; 0 keeps torch's default.

    The miss policy is the engine's (`engine.miss_policy`).
    """

    def __init__(
        self,
        engine: Engine,
        shards: Shards,
        writer: WriteBehind | None,
        metrics: PrefillMetrics,
        compute_lock: threading.Lock,
        fetch_deadline_s: float,
        default_ratio: float | None = None,
        layers_ahead: int = 2,
        pipeline: bool = True,
        num_threads: int = 0,
    ) -> None:
        self.engine, self.shards, self.writer, self.metrics = engine, shards, writer, metrics
        self.compute_lock = compute_lock
        self.fetch_deadline_s, self.default_ratio = fetch_deadline_s, default_ratio
        self.layers_ahead, self.pipeline, self.num_threads = layers_ahead, pipeline, num_threads
        cfg = engine.model.cfg
        self.layout = Layout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        # The RPC threads asking for compute threads are I/O threads (lowered priority);
        # compute threads start from this one, at the priority the server started with.
        self._starter = ThreadStarter("prefill-compute-starter")

    @property
    def num_layers(self) -> int:
        return self.layout.num_layers

    def prefill(self, request: PrefillRequest) -> Generator[FusedLayer | PrefillResult, None, None]:
        """The `Prefiller` protocol: fused layers in order, then the result.

        Closing the iterator early cancels the request's compute and fetches.
        """
        stream = self.start(request)
        try:
            yield from stream
        finally:
            stream.cancel()

    def start(self, request: PrefillRequest) -> BackgroundIterator[FusedLayer | PrefillResult]:
        """Validates `request` and starts computing it; iterate the result, `cancel` to stop.

        Raises:
            InvalidRequestError: malformed request (PromptTooLongError: it does not fit).
        """
        blend = self.validate(request)
        cancel = Cancel()
        return BackgroundIterator(
            lambda: self._compute(request, blend, cancel),
            self.layers_ahead,
            cancel.cancel,
            start=self._starter.start,
        )

    def validate(self, request: PrefillRequest) -> BlendConfig:
        """Checks what the model bounds (vocabulary, context) and returns the blend settings."""
        seg, cfg = request.segments, self.engine.model.cfg
        check_request_id(request.request_id)
        if not seg.query_ids:
            raise InvalidRequestError("the query segment is empty")
        for idx, chunk in enumerate(seg.chunk_ids):
            if not chunk:
                raise InvalidRequestError(f"chunk {idx} is empty")
        ids = seg.token_ids
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise InvalidRequestError(f"token ids must be in [0, {cfg.vocab_size})")
        total = seg.num_tokens + request.sampling.max_tokens
        if total > self.engine.max_context_tokens:
            raise PromptTooLongError(total, self.engine.max_context_tokens)
        ratio = request.recompute_ratio
        return self.engine.blend_config(self.default_ratio if ratio is None else ratio)

    def _compute(
        self, request: PrefillRequest, blend: BlendConfig, cancel: Cancel
    ) -> Iterator[FusedLayer | PrefillResult]:
        """Runs on the compute thread: the whole request, cleanup included."""
        start_s = time.perf_counter()
        compute_thread(self.num_threads)
        with torch.inference_mode():
            prompt = self.engine.prepare_tokens(request.segments)
            fetched = self._open(prompt, request.mode, cancel)
            buffered: list[FusedLayer | PrefillResult] = []
            try:
                if not self.pipeline:
                    for fetch in fetched.fetches:  # a failed fetch: the blend falls back
                        fetch.wait_complete()
                if not self._acquire(cancel):
                    return
                try:
                    self._precompute(prompt, request.mode, fetched)
                    items = self._blend(prompt, request, blend, fetched, cancel, start_s)
                    if self.pipeline:
                        yield from items
                    else:
                        buffered = list(items)
                finally:
                    self.compute_lock.release()
                yield from buffered
                if not cancel.event.is_set():
                    self._write_behind(prompt, request.mode, fetched)
            finally:
                for fetch in fetched.fetches:
                    fetch.close()

    def _precompute(self, prompt: PreparedPrompt, mode: Mode, fetched: Fetched) -> None:
        """Under `MissPolicy.PRECOMPUTE`: computes the misses standalone, into
        `fetched.precomputed`. Keys whose lookup failed are no misses: computed in place (fail
        soft, as after a failed stream). A fetched prefix is waited for whole only as the chunk
        context of a miss (if its stream fails: computed too, the failure counted)."""

        def whole(key: str) -> ChunkKV | None:
            for fetch in fetched.fetches:
                if key in fetch.chunks:
                    if fetch.wait_complete([key]):
                        return fetch.materialize(key)
                    self._count_failure(fetched, fetch)
                    return None
            return None

        known = fetched.chunks.keys() | fetched.unknown
        fetched.precomputed = self.engine.precompute_misses(
            prompt, mode, contains=known.__contains__, get_prefix=whole
        )
        self.metrics.misses_precomputed.inc(len(fetched.precomputed))

    def _acquire(self, cancel: Cancel) -> bool:
        while not self.compute_lock.acquire(timeout=_LOCK_POLL_S):
            if cancel.event.is_set():
                return False
        return True

    def _open(self, prompt: PreparedPrompt, mode: Mode, cancel: Cancel) -> Fetched:
        """Looks the prompt's objects up and starts streaming the ones its mode reads.

        Streams start before the compute lock is taken, so a queued request prefetches; the
        fetch deadline counts from here.
        """
        fetched = Fetched()
        if mode is Mode.FULL_PREFILL:
            return fetched
        seg = prompt.segments
        num_tokens = dict(zip(prompt.chunk_keys, map(len, seg.chunk_ids), strict=True))
        if seg.prefix_ids:
            num_tokens = {prompt.prefix_key: len(seg.prefix_ids), **num_tokens}
        read = set(num_tokens)
        if mode is Mode.PREFIX_CACHE:  # only the prefix and the chunk stored right after it
            read = {prompt.prefix_key, *prompt.chunk_keys[:1]}
        self.metrics.chunk_lookups.inc(len(num_tokens))
        for idx, keys in self.shards.split(list(num_tokens)).items():  # unique keys, in order
            try:
                infos = self.shards.sources[idx].lookup(keys)
            except KvfuseError as exc:
                self._count_fallback(fetched, fallback_reason(exc))
                fetched.unknown.update(keys)
                continue
            infos = {k: i for k, i in infos.items() if self._fits(i, num_tokens.get(k))}
            fetched.found.update(infos)
            self.metrics.chunk_hits.inc(len(infos))
            self._fetch(idx, {k: i for k, i in infos.items() if k in read}, fetched, cancel)
        return fetched

    def _fetch(
        self, idx: int, infos: dict[str, ChunkInfo], fetched: Fetched, cancel: Cancel
    ) -> None:
        """Starts one shard's layer stream (if it has anything to read)."""
        if not infos:
            return
        source = self.shards.sources[idx]
        fetch = LayerFetch(source, infos, self.layout, self.fetch_deadline_s, self.metrics)
        cancel.add(fetch.start())
        fetched.fetches.append(fetch)
        fetched.chunks.update(fetch.chunks)

    def _fits(self, info: ChunkInfo, num_tokens: int | None) -> bool:
        """A stored object is usable only with this model's layers and the segment's length
        (anything else is a foreign or corrupt entry: treated as a miss)."""
        return info.num_layers == self.num_layers and info.num_tokens == num_tokens

    def _blend(
        self,
        prompt: PreparedPrompt,
        request: PrefillRequest,
        blend: BlendConfig,
        fetched: Fetched,
        cancel: Cancel,
        start_s: float,
    ) -> Iterator[FusedLayer | PrefillResult]:
        """Runs the blend, restarting without chunks whose stream failed; yields each layer
        once, then the result."""
        chunks, num_sent = dict(fetched.chunks), 0
        while True:
            planned, run = self.engine.start_prefill(
                prompt, request.mode, blend, chunks, fetched.precomputed
            )
            try:
                for layer in run:
                    if cancel.event.is_set():
                        return
                    if layer.layer_idx >= num_sent:
                        self.metrics.layers_computed.inc()
                        num_sent += 1
                        yield layer
                break
            except CacheError:
                if cancel.event.is_set():
                    return
                lost = self._lost_chunks(fetched, chunks)
                if not lost:
                    raise
                chunks = {k: c for k, c in chunks.items() if k not in lost}
        first = Sampler(request.sampling).sample(run.last_logits)
        stats = replace(prefill_stats(run.stats, planned, start_s), fallback=fetched.fallback)
        num_reused = stats.num_cached_tokens + stats.num_precomputed_tokens
        if num_reused and request.mode is Mode.BLEND:
            self.metrics.recompute_ratio.observe(stats.num_recomputed_tokens / num_reused)
        yield PrefillResult(first, stats)

    def _lost_chunks(self, fetched: Fetched, chunks: dict[str, StreamedChunk]) -> set[str]:
        """Chunks in use whose fetch failed before they arrived whole; counts each failure."""
        lost: set[str] = set()
        for fetch in fetched.fetches:
            if fetch.failed:
                self._count_failure(fetched, fetch)
                lost |= (fetch.chunks.keys() - fetch.complete_keys()) & chunks.keys()
        return lost

    def _count_failure(self, fetched: Fetched, fetch: LayerFetch) -> None:
        if reason := fetched.new_failure(fetch):
            self._count_fallback(fetched, reason)

    def _count_fallback(self, fetched: Fetched, reason: str) -> None:
        self.metrics.fallbacks.labels(reason).inc()
        fetched.fallback = fetched.fallback or reason

    def _write_behind(self, prompt: PreparedPrompt, mode: Mode, fetched: Fetched) -> None:
        """Queues the prompt's objects the lookup did not find (never blocks), with those the
        request precomputed (only stored then)."""
        if self.writer is None or mode is Mode.FULL_PREFILL:
            return
        keys = {*prompt.chunk_keys}
        if prompt.segments.prefix_ids:
            keys.add(prompt.prefix_key)
        missing = keys - fetched.found - fetched.unknown
        if not missing:
            return
        prefix = fetched.chunks.get(prompt.prefix_key)
        prefix_kv = None
        if prefix is not None:
            fetch = next(f for f in fetched.fetches if prompt.prefix_key in f.chunks)
            prefix_kv = fetch.materialize(prompt.prefix_key)
        computed = {k: kv for k, kv in fetched.precomputed.items() if k in missing}
        self.writer.submit(WriteJob(prompt, frozenset(missing), prefix_kv, computed))
