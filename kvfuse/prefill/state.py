"""One prefill request's state: what its lookup found and the streams bringing it in."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvfuse.kv import ChunkKV, ChunkLayers
from kvfuse.prefill.fetch import CANCELLED, LayerFetch
from kvfuse.prefill.observer import PrefillObserver


@dataclass
class Fetched:
    """What the lookup found and which streams bring it in.

    Attributes:
        observer: told of every fallback (`fall_back`, `count_failure`).
        chunks: the found objects the request reads: streaming in (a `LayerFetch`'s chunks)
            or whole (an in-process store's).
        found: every key the lookup found usable, read or not.
        lookup_failed: keys whose lookup failed (neither found nor missing).
        in_place: found keys the request computes in place rather than fetches (their tier
            loads slower than they compute).
        precomputed: misses the request computed standalone (miss policy precompute).
    """

    observer: PrefillObserver = field(default_factory=PrefillObserver)
    chunks: dict[str, ChunkLayers] = field(default_factory=dict)
    fetches: list[LayerFetch] = field(default_factory=list)
    found: set[str] = field(default_factory=set)
    lookup_failed: set[str] = field(default_factory=set)
    in_place: set[str] = field(default_factory=set)
    precomputed: dict[str, ChunkKV] = field(default_factory=dict)
    fallback: str = ""
    _counted: set[int] = field(default_factory=set, init=False, repr=False)  # fetch ids

    def fetch_of(self, key: str) -> LayerFetch:
        """The stream bringing `key` in (a streamed chunk's)."""
        return next(fetch for fetch in self.fetches if key in fetch.chunks)

    def arrived(self, key: str) -> ChunkKV | None:
        """A found object whose every layer is here, whole; None otherwise (never waits)."""
        chunk = self.chunks.get(key)
        if chunk is None or isinstance(chunk, ChunkKV):
            return chunk
        return self.fetch_of(key).materialize(key)

    def whole(self, key: str) -> ChunkKV | None:
        """A found object in full, waiting for its stream; None if it was not found or its
        stream failed (the failure counted)."""
        chunk = self.chunks.get(key)
        if chunk is None or isinstance(chunk, ChunkKV):
            return chunk
        fetch = self.fetch_of(key)
        if fetch.wait_complete([key]):
            return fetch.materialize(key)
        self.count_failure(fetch)
        return None

    def fall_back(self, reason: str) -> None:
        """Records that the request computes what it meant to fetch (the first reason is
        the one its stats report) and tells the observer."""
        self.observer.fell_back(reason)
        self.fallback = self.fallback or reason

    def count_failure(self, fetch: LayerFetch) -> None:
        """Counts `fetch`'s failure once (`new_failure`)."""
        if reason := self.new_failure(fetch):
            self.fall_back(reason)

    def new_failure(self, fetch: LayerFetch) -> str:
        """Why `fetch` failed, the first time it is asked; "" after that, or if it did not fail
        or was cancelled (the request is going away: nothing to count)."""
        if not fetch.failed or fetch.reason == CANCELLED or id(fetch) in self._counted:
            return ""
        self._counted.add(id(fetch))
        return fetch.reason
