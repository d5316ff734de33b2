"""Warm: precompute a prompt's missing chunks and store them before any request needs them.

A RAG deployment knows its documents before the questions arrive; storing their KV at ingest
turns the first request over them from a miss (computed at full cost) into a hit. One warmer
serves the embedded engine (over its in-process store) and the prefill worker (over its cache
shards).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager

import torch

from kvfuse.errors import InvalidRequestError, KvfuseError, PromptTooLongError
from kvfuse.kv import ChunkKV
from kvfuse.prefill.compute import PrefillCompute
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.sources import Shards
from kvfuse.prefill.types import WarmResult
from kvfuse.segments import PromptSegments

log = logging.getLogger(__name__)

MAX_WARM_CHUNKS = 256  # chunks in one warm call (each computed in turn: seconds apiece on a CPU)


def warm_segments(segments: PromptSegments, vocab_size: int, max_context: int) -> PromptSegments:
    """What a warm call stores of `segments`: the prefix and the distinct chunks in order, the
    query dropped.

    Raises:
        InvalidRequestError: no chunk, too many, an empty one, a token id outside the vocabulary.
        PromptTooLongError: the prefix and the longest chunk do not fit the context.
    """
    chunks = tuple(dict.fromkeys(segments.chunk_ids))
    if not chunks or len(chunks) > MAX_WARM_CHUNKS:
        raise InvalidRequestError(f"warm 1 to {MAX_WARM_CHUNKS} chunks (got {len(chunks)})")
    if not all(chunks):
        raise InvalidRequestError(f"chunk {chunks.index(())} is empty")
    if any(not 0 <= t < vocab_size for ids in (segments.prefix_ids, *chunks) for t in ids):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})")
    longest = len(segments.prefix_ids) + max(map(len, chunks))
    if longest > max_context:
        raise PromptTooLongError(longest, max_context)
    return PromptSegments(segments.prefix_ids, chunks, ())


class Warmer:
    """The `ChunkWarmer`: looks the objects up on their shards, computes the missing ones one
    at a time under the compute lock (a request waits for one object at most), and stores
    each on the shard that owns it before answering.

    A shard whose lookup fails counts its objects as missing: they are computed and their
    store is tried (and counted failed if it fails too). The prefix is recomputed as the
    chunks' context rather than fetched (it is short). Thread-safe; the caller's thread
    computes, so call it from a thread that may (an I/O thread keeps requests first).
    """

    def __init__(
        self,
        compute: PrefillCompute,
        shards: Shards,
        compute_lock: AbstractContextManager[object],
        observer: PrefillObserver,
    ) -> None:
        self.compute, self.shards = compute, shards
        self.compute_lock, self.observer = compute_lock, observer

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        """Raises InvalidRequestError / PromptTooLongError for segments it cannot store.
        `request_id` is for the caller's logs."""
        start = time.perf_counter()
        vocab_size = self.compute.model.cfg.vocab_size
        segments = warm_segments(segments, vocab_size, self.compute.max_context_tokens)
        prompt = self.compute.prepare(segments)
        objects = prompt.object_keys
        present = self._lookup(objects)
        num_present = len(present)
        computed = self.compute.missing(prompt, present.__contains__, lambda _key: None)
        num_stored = num_failed = num_tokens = 0
        while True:
            with self.compute_lock, torch.inference_mode():
                item = next(computed, None)
            if item is None:
                break
            key, kv = item
            num_tokens += kv.num_tokens
            if key in present:  # a stored prefix, recomputed as the chunks' context
                continue
            stored = self._store(key, kv)
            num_stored += stored is True
            num_failed += stored is None
            num_present += stored is False
        elapsed = time.perf_counter() - start
        result = WarmResult(len(objects), num_present, num_stored, num_failed, num_tokens, elapsed)
        self.observer.warmed(result)
        return result

    def _store(self, key: str, kv: ChunkKV) -> bool | None:
        """True: stored; False: it was stored meanwhile; None: storing failed (logged)."""
        try:
            return self.shards.put(key, kv)
        except KvfuseError as exc:
            log.warning("warm: storing %s failed: %s", key[:12], exc)
            return None

    def _lookup(self, keys: list[str]) -> set[str]:
        """The keys some shard holds; a shard that fails to answer holds none of its keys."""
        present: set[str] = set()
        for idx, shard_keys in self.shards.split(keys).items():
            try:
                present |= self.shards.sources[idx].lookup(shard_keys).keys()
            except KvfuseError as exc:
                log.warning("warm: lookup on shard %d failed: %s", idx, exc)
        return present
