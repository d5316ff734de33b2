"""A request's objects looked up on their shards and opened for reading: a layer stream started
per shard for the ones its mode reads, an in-process store's objects taken whole."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from kvfuse.blend.config import Mode
from kvfuse.errors import KvfuseError
from kvfuse.keys import PreparedPrompt
from kvfuse.prefill.fetch import LayerFetch, Layout, fallback_reason
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.sources import ChunkSource, Shards, StoreSource
from kvfuse.prefill.state import Fetched
from kvfuse.prefill.types import Cancel, ChunkInfo


class Reading(NamedTuple):
    """How one request reads: what every layer must look like, how long its streams may take
    in all, whom to tell, and its cancel flag (which cancels its streams)."""

    layout: Layout
    deadline_s: float
    observer: PrefillObserver
    cancel: Cancel


# Given what the lookup found that the mode reads, the keys to compute in place instead.
Chooser = Callable[[Mapping[str, ChunkInfo]], set[str]]


def open_objects(
    prompt: PreparedPrompt,
    mode: Mode,
    shards: Shards,
    reading: Reading,
    choose: Chooser | None = None,
) -> Fetched:
    """Looks the prompt's prefix and chunks up and starts reading the ones `mode` reads,
    except those `choose` (called once, with every shard's findings) keeps in place.

    Streams start before the caller takes its compute lock, so a queued request prefetches;
    the deadline counts from here. A shard whose lookup fails makes its keys
    `lookup_failed` (computed in place) and counts a fallback. A stored object of the wrong
    layout (layers, length) is a miss.
    """
    fetched = Fetched(reading.observer)
    if mode is Mode.FULL_PREFILL:
        return fetched
    seg = prompt.segments
    num_tokens = dict(zip(prompt.chunk_keys, map(len, seg.chunk_ids), strict=True))
    if seg.prefix_ids:
        num_tokens = {prompt.prefix_key: len(seg.prefix_ids), **num_tokens}
    read = set(num_tokens)
    if mode is Mode.PREFIX_CACHE:  # only the prefix and the chunk stored right after it
        read = {prompt.prefix_key, *prompt.chunk_keys[:1]}
    wanted: dict[int, dict[str, ChunkInfo]] = {}
    for idx, keys in shards.split(list(num_tokens)).items():  # unique keys, in order
        try:
            infos = shards.sources[idx].lookup(keys)
        except KvfuseError as exc:
            reading.observer.looked_up(len(keys), 0)
            fetched.fall_back(fallback_reason(exc))
            fetched.lookup_failed.update(keys)
            continue
        num_layers = reading.layout.num_layers
        infos = {
            k: i
            for k, i in infos.items()
            if i.num_layers == num_layers and i.num_tokens == num_tokens.get(k)
        }
        reading.observer.looked_up(len(keys), len(infos))
        fetched.found.update(infos)
        wanted[idx] = {k: i for k, i in infos.items() if k in read}
    if choose is not None:
        fetched.in_place = choose({k: i for infos in wanted.values() for k, i in infos.items()})
    for idx, infos in wanted.items():
        kept = {k: i for k, i in infos.items() if k not in fetched.in_place}
        _read(shards.sources[idx], kept, fetched, reading)
    return fetched


def _read(
    source: ChunkSource, infos: dict[str, ChunkInfo], fetched: Fetched, reading: Reading
) -> None:
    """Starts one shard's layer stream (if it has anything to read); an in-process store's
    objects are taken whole, in place."""
    if not infos:
        return
    if isinstance(source, StoreSource):
        whole = {key: kv for key in infos if (kv := source.get(key)) is not None}
        fetched.found.difference_update(infos.keys() - whole.keys())  # evicted meanwhile
        fetched.chunks.update(whole)
        return
    fetch = LayerFetch(source, infos, reading.layout, reading.deadline_s, reading.observer)
    reading.cancel.on_cancel(fetch.start().cancel)
    fetched.fetches.append(fetch)
    fetched.chunks.update(fetch.chunks)
