"""Warm: precompute a prompt's missing chunks and store them before any request needs them.

A RAG deployment knows its documents before the questions arrive; storing their KV at ingest
turns the first request over them from a miss (computed at full cost) into a hit.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from kvfuse.engine import Engine
from kvfuse.errors import KvfuseError
from kvfuse.prefill import WarmResult, warm_segments
from kvfuse.segments import PromptSegments
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
        objects = list(dict.fromkeys(prompt.chunk_keys))
        if segments.prefix_ids:
            objects.insert(0, prompt.prefix_key)
        present = self._lookup(objects)
        computed = engine.compute_missing(prompt, present.__contains__, lambda _key: None)
        stored = failed = num_tokens = 0
        while True:
            with self.compute_lock, torch.inference_mode():
                item = next(computed, None)
            if item is None:
                break
            key, kv = item
            num_tokens += kv.num_tokens
            if key in present:  # the stored prefix, recomputed as the chunks' context
                continue
            try:
                if self.shards.sources[self.shards.owner(key)].put(key, kv):
                    stored += 1
                else:  # stored meanwhile (a request's write-behind)
                    present.add(key)
            except KvfuseError as exc:
                failed += 1
                log.warning("warm: storing %s failed: %s", key[:12], exc)
        for result, count in (("present", len(present)), ("stored", stored), ("failed", failed)):
            self.metrics.warm_objects.labels(result).inc(count)
        elapsed = time.perf_counter() - start
        return WarmResult(len(objects), len(present), stored, failed, num_tokens, elapsed)

    def _lookup(self, keys: list[str]) -> set[str]:
        """The keys some shard holds; a shard that fails to answer holds none of its keys."""
        present: set[str] = set()
        for idx, shard_keys in self.shards.split(keys).items():
            try:
                present |= self.shards.sources[idx].lookup(shard_keys).keys()
            except KvfuseError as exc:
                log.warning("warm: lookup on shard %d failed: %s", idx, exc)
        return present
