"""The memory tier: an LRU map with high/low watermarks and TinyLFU admission."""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from cache_server.admission import FrequencySketch
from cache_server.objects import ObjectMeta, StoredObject
from cache_server.tiers.base import Tier, TierStats
from kvfuse.errors import CapacityError, ConfigError, InvalidObjectError

# Per-entry bookkeeping not covered by sys.getsizeof of the object graph below: the
# OrderedDict slot and linked-list node and the (object, nbytes) tuple. Checked against
# tracemalloc in tests/cache_server/test_tier_memory.py.
ENTRY_OVERHEAD_BYTES = 160


def held_nbytes(obj: StoredObject) -> int:
    """Bytes of RAM `obj` holds: layer records, the tuples around them and the metadata."""
    meta = obj.meta
    num = sys.getsizeof(obj) + sys.getsizeof(obj.layers) + sum(map(sys.getsizeof, obj.layers))
    num += sys.getsizeof(meta) + sys.getsizeof(meta.__dict__)
    num += sys.getsizeof(meta.key) + sys.getsizeof(meta.codec)
    num += sys.getsizeof(meta.layer_nbytes) + sum(map(sys.getsizeof, meta.layer_nbytes))
    num += sys.getsizeof(meta.layer_crc32) + sum(map(sys.getsizeof, meta.layer_crc32))
    return num + ENTRY_OVERHEAD_BYTES


class MemoryTier(Tier):
    """Objects held in RAM, bounded by `capacity_bytes` of accounted memory. Thread-safe.

    A put that would take the accounted bytes above `high_watermark × capacity` evicts least
    recently used unpinned objects until the new object fits under `low_watermark × capacity`
    (so evictions come in batches, not one per put). Admission (TinyLFU): when the put needs
    evictions, the new object is admitted only if its estimated access frequency is not lower
    than that of each victim needed to fit it under the high watermark; otherwise it is
    declined and returned as evicted. Extra evictions towards the low watermark stop at the
    first victim hotter than the new object. With free room, puts are always admitted.

    Records are held by reference (bytes are immutable) and trusted as handed in: the store
    verifies checksums on put, so reads here do not recompute CRCs. Accesses (`get`,
    `get_layer` of layer 0, and misses) feed the frequency sketch.

    Args:
        capacity_bytes: the budget, counted with `held_nbytes` (records + metadata).
        high_watermark, low_watermark: fractions of capacity, 0 < low ≤ high ≤ 1.
        codec: the codec objects are stored in here (the store transcodes to it).
        admission: False disables the frequency filter (plain LRU).
    """

    def __init__(
        self,
        capacity_bytes: int,
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        codec: str = "raw",
        name: str = "memory",
        admission: bool = True,
    ) -> None:
        if capacity_bytes <= 0:
            raise ConfigError("memory tier capacity_bytes must be positive")
        if not 0.0 < low_watermark <= high_watermark <= 1.0:
            raise ConfigError("memory tier needs 0 < low_watermark <= high_watermark <= 1")
        self.name, self.codec = name, codec
        self.capacity_bytes = capacity_bytes
        self.high_bytes = int(capacity_bytes * high_watermark)
        self.low_bytes = int(capacity_bytes * low_watermark)
        self._sketch = FrequencySketch() if admission else None
        self._objects: OrderedDict[str, tuple[StoredObject, int]] = OrderedDict()
        self._pinned: set[str] = set()
        self._protected: frozenset[str] = frozenset()  # the placement's lease (`protect`)
        self._protected_until = 0.0
        self._stored_bytes = 0
        self._lock = threading.Lock()
        self._num_evictions = self._num_rejected = 0

    def put(self, obj: StoredObject) -> list[StoredObject]:
        key, nbytes = obj.meta.key, held_nbytes(obj)
        with self._lock:
            self._count_access(key)
            old = self._objects.get(key)
            base_bytes = self._stored_bytes - (old[1] if old else 0)
            victims = self._choose_victims(key, base_bytes + nbytes, nbytes, resident=bool(old))
            if victims is None:
                self._num_rejected += 1
                return [obj]
            if old is not None:
                self._remove(key, keep_pin=True)
            evicted = [self._remove(victim) for victim in victims]
            self._num_evictions += len(evicted)
            self._objects[key] = (obj, nbytes)
            self._stored_bytes += nbytes
            return evicted

    def _choose_victims(
        self, key: str, needed_bytes: int, nbytes: int, resident: bool
    ) -> list[str] | None:
        """Keys to evict so that `needed_bytes` in total fit; None if admission declines.

        Raises CapacityError if evicting every unpinned object would not make room. A key
        that is already resident is replaced without an admission check.
        """
        if needed_bytes <= self.high_bytes:
            return []
        pinned_bytes = sum(self._objects[k][1] for k in self._pinned if k != key)
        if pinned_bytes + nbytes > self.high_bytes:
            raise CapacityError(
                f"{self.name} tier: {nbytes} bytes do not fit in {self.high_bytes} bytes "
                f"next to {pinned_bytes} pinned bytes"
            )
        use_admission = self._sketch is not None and not resident
        freq = self._sketch.estimate(key) if self._sketch is not None else 0
        leased = self._protected if time.monotonic() < self._protected_until else frozenset()
        victims: list[str] = []
        for victim, (_, victim_bytes) in self._objects.items():
            if needed_bytes <= self.low_bytes:
                break
            if victim == key or victim in self._pinned or victim in leased:
                continue
            if use_admission and self._sketch is not None and self._sketch.estimate(victim) > freq:
                if needed_bytes > self.high_bytes:
                    return None  # a victim we need is hotter than the newcomer: decline
                break  # it fits already; do not flush hotter objects just for headroom
            victims.append(victim)
            needed_bytes -= victim_bytes
        if needed_bytes > self.high_bytes:
            return None  # the rest is leased to hotter objects: the newcomer goes down a tier
        return victims

    def _remove(self, key: str, keep_pin: bool = False) -> StoredObject:
        obj, nbytes = self._objects.pop(key)
        self._stored_bytes -= nbytes
        if not keep_pin:
            self._pinned.discard(key)
        return obj

    def _count_access(self, key: str) -> None:
        if self._sketch is not None:
            self._sketch.increment(key)

    def get_meta(self, key: str) -> ObjectMeta | None:
        with self._lock:
            entry = self._objects.get(key)
            return entry[0].meta if entry else None

    def get_layer(self, key: str, layer_idx: int) -> bytes | None:
        with self._lock:
            entry = self._objects.get(key)
            if layer_idx == 0:
                self._count_access(key)
                if entry is not None:
                    self._objects.move_to_end(key)
        if entry is None:
            return None
        obj = entry[0]
        if not 0 <= layer_idx < obj.meta.num_layers:
            raise InvalidObjectError(f"{key}: no layer {layer_idx}")
        return obj.layers[layer_idx]

    def get(self, key: str) -> StoredObject | None:
        with self._lock:
            self._count_access(key)
            entry = self._objects.get(key)
            if entry is None:
                return None
            self._objects.move_to_end(key)
            return entry[0]

    def peek(self, key: str) -> StoredObject | None:
        with self._lock:
            entry = self._objects.get(key)
            return entry[0] if entry else None

    def delete(self, key: str) -> bool:
        with self._lock:
            if key not in self._objects:
                return False
            self._remove(key)
            return True

    def pin(self, key: str) -> bool:
        with self._lock:
            if key not in self._objects:
                return False
            self._pinned.add(key)
            return True

    def unpin(self, key: str) -> bool:
        with self._lock:
            if key not in self._pinned:
                return False
            self._pinned.discard(key)
            return True

    def protect(self, keys: Iterable[str], until: float) -> int:
        with self._lock:
            self._protected = frozenset(k for k in keys if k in self._objects)
            self._protected_until = until
            return len(self._protected)

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return key in self._pinned

    def keys(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._objects))

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                name=self.name,
                up=True,
                capacity_bytes=self.capacity_bytes,
                stored_bytes=self._stored_bytes,
                num_objects=len(self._objects),
                num_pinned=len(self._pinned),
                num_evictions=self._num_evictions,
                num_corrupt=0,
                num_rejected=self._num_rejected,
            )

    def check_integrity(self) -> None:
        """Raises AssertionError if the accounting disagrees with the contents."""
        with self._lock:
            assert self._stored_bytes == sum(n for _, n in self._objects.values())
            assert self._stored_bytes <= self.high_bytes
            assert self._pinned <= set(self._objects)
