"""In-process chunk KV store: a byte-bounded LRU map from chunk key to `ChunkKV`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvfuse.kv import ChunkKV


@dataclass(frozen=True)
class StoreStats:
    num_objects: int
    stored_bytes: int
    capacity_bytes: int
    num_hits: int
    num_misses: int
    num_evictions: int


class ChunkStore:
    """Least-recently-used chunk store bounded by `capacity_bytes`. Thread-safe.

    `get` returns None on a miss. `put` evicts least recently used objects until the new one
    fits; an object larger than the whole capacity is not stored (returns False).
    """

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._objects: OrderedDict[str, ChunkKV] = OrderedDict()
        self._stored_bytes = 0
        self._lock = threading.Lock()
        self._num_hits = self._num_misses = self._num_evictions = 0

    def get(self, key: str) -> ChunkKV | None:
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                self._num_misses += 1
                return None
            self._objects.move_to_end(key)
            self._num_hits += 1
            return obj

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def put(self, key: str, obj: ChunkKV) -> bool:
        with self._lock:
            if obj.num_bytes > self.capacity_bytes:
                return False
            self._remove(key)
            while self._stored_bytes + obj.num_bytes > self.capacity_bytes:
                self._remove(next(iter(self._objects)))
                self._num_evictions += 1
            self._objects[key] = obj
            self._stored_bytes += obj.num_bytes
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._stored_bytes = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(
                len(self._objects),
                self._stored_bytes,
                self.capacity_bytes,
                self._num_hits,
                self._num_misses,
                self._num_evictions,
            )

    def _remove(self, key: str) -> bool:
        obj = self._objects.pop(key, None)
        if obj is None:
            return False
        self._stored_bytes -= obj.num_bytes
        return True
