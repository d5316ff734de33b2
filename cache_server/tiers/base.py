"""The tier contract every storage tier implements."""

from __future__ import annotations

import contextlib
import itertools
import mmap
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cache_server.objects import ObjectMeta, StoredObject


@dataclass(frozen=True)
class Staged:
    """A put prepared by `Tier.stage` for `Tier.commit` (tiers subclass it with their state)."""

    obj: StoredObject


class MappedObject:
    """A stored object whose records are views of a read-only file mapping: read from the
    page cache with no copy into the process.

    The mapping pins the file version it was made from: a replace, eviction or delete
    unlinks the path, never the pages being read (files are never written in place). Close
    it, or use it as a context manager, once the record views are no longer used.
    """

    def __init__(self, meta: ObjectMeta, mapping: mmap.mmap, data_offset: int) -> None:
        self.meta = meta
        self._mapping = mapping
        self._view = memoryview(mapping)
        self._offsets = list(itertools.accumulate(meta.layer_nbytes, initial=data_offset))

    @property
    def layers(self) -> tuple[memoryview, ...]:
        """The layer records, as views into the mapping."""
        ends = self._offsets
        return tuple(self._view[start:end] for start, end in itertools.pairwise(ends))

    def close(self) -> None:
        self._view.release()
        with contextlib.suppress(BufferError):  # a record view is still held: unmapped with it
            self._mapping.close()

    def __enter__(self) -> MappedObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TierStats:
    """A snapshot of one tier's counters (monotonic counters since start)."""

    name: str
    up: bool
    capacity_bytes: int
    stored_bytes: int
    num_objects: int
    num_pinned: int
    num_evictions: int
    num_corrupt: int
    num_rejected: int


class Tier(ABC):
    """A byte-budgeted key → StoredObject store. Implementations are thread-safe.

    Contract:
        - `put` is atomic: readers see the whole object or nothing, never a partial one.
          Storing an existing key replaces it atomically. The tier makes room by evicting
          unpinned objects and returns the evicted ones so the caller can demote them to a
          lower tier. It raises CapacityError (and stores nothing) when the object cannot fit
          without evicting pinned objects or is larger than the budget allows. A tier with an
          admission policy may decline `obj` itself (counted in num_rejected): it then stores
          nothing and returns `obj` among the "evicted" objects, so the caller demotes it like
          any evictee.
        - Reads return None on a miss. A record that fails its checksum is quarantined
          (removed, counted in num_corrupt) and reported as a miss; it is never returned.
        - A tier that cannot reach its backend raises TierUnavailableError from every call
          and reports up=False in `stats`; it recovers by itself when the backend returns.
        - Pins survive until `unpin` or `delete`; pinned objects are never evicted.
        - Accesses (for LRU/LFU ordering): `get`, and `get_layer` of layer 0 (one access per
          layer-by-layer read). `get_meta`, `keys` and `stats` are not accesses.
        - `get_layer` with a layer index outside [0, num_layers) of a stored object raises
          InvalidObjectError.
    """

    name: str
    codec: str  # the codec this tier stores records in (kvfuse.codecs name)

    @abstractmethod
    def put(self, obj: StoredObject) -> list[StoredObject]:
        """Stores `obj`; returns the objects evicted to make room (possibly empty)."""

    @abstractmethod
    def get_meta(self, key: str) -> ObjectMeta | None:
        """Metadata of `key`, or None. Does not count as an access for eviction."""

    @abstractmethod
    def get_layer(self, key: str, layer_idx: int) -> bytes | None:
        """The verified record of one layer, or None (miss or quarantined)."""

    @abstractmethod
    def get(self, key: str) -> StoredObject | None:
        """The whole verified object, or None. Counts as an access."""

    def get_mapped(self, key: str) -> MappedObject | None:
        """The whole verified object as views of its file (counted as an access), for tiers
        that keep files; None on a miss, a quarantined file, where files cannot be mapped
        safely, and always for other tiers (then use `get`). The caller closes it."""
        del key
        return None

    def peek(self, key: str) -> StoredObject | None:
        """The whole object like `get`, but not counted as an access (a copy made for the
        tier's own housekeeping must not make an object look hot)."""
        return self.get(key)

    def stage(self, obj: StoredObject) -> Staged:
        """The slow half of `put(obj)` (writing the bytes), to run outside the caller's locks;
        `commit` makes it visible, `discard` releases what a commit did not take. Raises
        CapacityError early when `obj` cannot fit. Tiers without a slow half stage nothing and
        store in `commit`."""
        return Staged(obj)

    def commit(self, staged: Staged) -> list[StoredObject]:
        """Stores the staged object: `put`'s result and errors."""
        return self.put(staged.obj)

    def discard(self, staged: Staged) -> None:  # noqa: B027 - optional hook
        """Releases a staged put (after `commit`, or instead of it); idempotent."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Removes `key` (pinned or not); True if it was there."""

    @abstractmethod
    def pin(self, key: str) -> bool:
        """Protects `key` from eviction; True if it is stored here."""

    @abstractmethod
    def unpin(self, key: str) -> bool:
        """Lifts the pin; True if it was pinned."""

    @abstractmethod
    def is_pinned(self, key: str) -> bool:
        """True if `key` is stored here and pinned."""

    def protect(self, keys: Iterable[str], until: float) -> int:
        """A lease: until `until` (time.monotonic()), eviction passes over `keys` (those stored
        here), replacing the previous lease. Returns how many it covers; tiers that do not
        evict by recency keep nothing (0)."""
        del keys, until
        return 0

    @abstractmethod
    def keys(self) -> Iterator[str]:
        """All stored keys (a snapshot; order unspecified)."""

    @abstractmethod
    def stats(self) -> TierStats:
        """Current counters."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases files, connections and threads."""
