"""Storing a prompt's chunks before the requests that read them: what both warmers share
(the engine in-process, the prefill worker over its cache shards)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

from kvfuse.blend.plan import PreparedPrompt
from kvfuse.errors import InvalidRequestError, KvfuseError, PromptTooLongError
from kvfuse.kv import ChunkKV
from kvfuse.segments import PromptSegments

MAX_WARM_CHUNKS = 256  # chunks in one warm call (each computed in turn: seconds apiece on a CPU)


def warm_segments(segments: PromptSegments, vocab_size: int, max_context: int) -> PromptSegments:
    """What a `ChunkWarmer` stores of `segments`: the prefix and the distinct chunks in order,
    the query dropped.

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


def warm_objects(prompt: PreparedPrompt) -> list[str]:
    """The keys a warm call stores: the prefix (if the prompt has one), then each distinct
    chunk in order."""
    prefix = [prompt.prefix_key] if prompt.segments.prefix_ids else []
    return prefix + list(dict.fromkeys(prompt.chunk_keys))


def store_computed(
    computed: Iterator[tuple[str, ChunkKV]],
    present: set[str],
    lock: AbstractContextManager[object],
    store: Callable[[str, ChunkKV], bool],
) -> tuple[int, int, int]:
    """Computes the objects of `computed` one per hold of `lock` (requests run in between)
    and stores each one not in `present`; returns (stored, failed, computed tokens).

    `store` returns False when the object was stored meanwhile (it joins `present`) and raises
    a KvfuseError when storing fails (counted, not raised).
    """
    stored = failed = num_tokens = 0
    while True:
        with lock, torch.inference_mode():
            item = next(computed, None)
        if item is None:
            return stored, failed, num_tokens
        key, kv = item
        num_tokens += kv.num_tokens
        if key in present:  # a stored prefix, recomputed as the chunks' context
            continue
        try:
            if store(key, kv):
                stored += 1
            else:
                present.add(key)
        except KvfuseError:
            failed += 1
