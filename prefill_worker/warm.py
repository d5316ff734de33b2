"""Warm: precompute a prompt's missing chunks and store them before any request needs them.

A RAG deployment knows its documents before the questions arrive; storing their KV at ingest
turns the first request over them from a miss (computed at full cost) into a hit.
"""

from __future__ import annotations

import logging
import threading
import time

from kvfuse.engine import Engine
from kvfuse.errors import KvfuseError
from kvfuse.kv import ChunkKV
from kvfuse.prefill import WarmResult
from kvfuse.segments import PromptSegments
from kvfuse.warm import store_computed, warm_objects, warm_segments
from prefill_worker.metrics import PrefillMetrics
from prefill_worker.sources import Shards

log = logging.getLogger(__name__)


class Warmer:
    """The prefill worker's `ChunkWarmer`: looks the objects up on their shards, computes the
    missing ones one at a time under the compute lock (a request waits for one object at
    most), and stores each on the shard that owns it before answering.

    A shard whose lookup fails counts its objects as missing: they are computed and their
    store is tried (and counted failed if it fails too). The prefix is recomputed as the
    chunks' context rather than fetched (it is short). Thread-safe; the caller's thread
    computes, so call it from a thread that may (an I/O thread keeps requests first).
    """

    def __init__(
        self,
        engine: Engine,
        shards: Shards,
        compute_lock: threading.Lock,
        metrics: PrefillMetrics,
    ) -> None:
        self.engine, self.shards = engine, shards
        self.compute_lock, self.metrics = compute_lock, metrics

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        """Raises InvalidRequestError / PromptTooLongError for segments it cannot store.
        `request_id` is for the caller's logs."""
        start = time.perf_counter()
        engine = self.engine
        segments = warm_segments(segments, engine.model.cfg.vocab_size, engine.max_context_tokens)
        prompt = engine.prepare_tokens(segments)
        objects = warm_objects(prompt)
        present = self._lookup(objects)
        computed = engine.compute_missing(prompt, present.__contains__, lambda _key: None)
        stored, failed, num_tokens = store_computed(
            computed, present, self.compute_lock, self._store
        )
        for result, count in (("present", len(present)), ("stored", stored), ("failed", failed)):
            self.metrics.warm_objects.labels(result).inc(count)
        elapsed = time.perf_counter() - start
        return WarmResult(len(objects), len(present), stored, failed, num_tokens, elapsed)

    def _store(self, key: str, kv: ChunkKV) -> bool:
        try:
            return self.shards.sources[self.shards.owner(key)].put(key, kv)
        except KvfuseError as exc:
            log.warning("warm: storing %s failed: %s", key[:12], exc)
            raise

    def _lookup(self, keys: list[str]) -> set[str]:
        """The keys some shard holds; a shard that fails to answer holds none of its keys."""
        present: set[str] = set()
        for idx, shard_keys in self.shards.split(keys).items():
            try:
                present |= self.shards.sources[idx].lookup(shard_keys).keys()
            except KvfuseError as exc:
                log.warning("warm: lookup on shard %d failed: %s", idx, exc)
        return present
