"""One prefill request's state: what its lookup found, the streams bringing it in, cancelling."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kvfuse.kv import ChunkKV
from prefill_worker.remote_chunks import CANCELLED, LayerFetch, StreamedChunk


@dataclass
class Fetched:
    """What the lookup found and which streams bring it in."""

    chunks: dict[str, StreamedChunk] = field(default_factory=dict)
    fetches: list[LayerFetch] = field(default_factory=list)
    found: set[str] = field(default_factory=set)
    unknown: set[str] = field(default_factory=set)  # keys whose lookup failed
    precomputed: dict[str, ChunkKV] = field(default_factory=dict)  # misses computed standalone
    fallback: str = ""
    _counted: set[int] = field(default_factory=set, init=False, repr=False)  # fetch ids

    def new_failure(self, fetch: LayerFetch) -> str:
        """Why `fetch` failed, the first time it is asked; "" after that, or if it did not fail
        or was cancelled (the request is going away: nothing to count)."""
        if not fetch.failed or fetch.reason == CANCELLED or id(fetch) in self._counted:
            return ""
        self._counted.add(id(fetch))
        return fetch.reason


class Cancel:
    """A request's cancel flag; cancelling also cancels its fetches. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fetches: list[LayerFetch] = []
        self.event = threading.Event()

    def add(self, fetch: LayerFetch) -> None:
        with self._lock:
            self._fetches.append(fetch)
            if self.event.is_set():
                fetch.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.event.set()
            fetches = list(self._fetches)
        for fetch in fetches:
            fetch.cancel()
