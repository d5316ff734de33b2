"""TieredStore: the tiers in order (memory → disk → Redis) behind one interface.

INTERFACE DRAFT — to be implemented (issue 3). Signatures are the contract the servicer uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cache_server.objects import ObjectMeta, StoredObject
from cache_server.tiers.base import Tier, TierStats


@dataclass(frozen=True)
class Location:
    """Where a key lives: the highest tier holding it and its metadata there."""

    tier: str
    meta: ObjectMeta
    pinned: bool


class TieredStore:
    """Tiers ordered fastest first. Thread-safe.

    - `put` stores into the first tier (transcoding to that tier's codec when it differs);
      objects the tier evicts are demoted to the next tier (transcoded to its codec), and off
      the end they are dropped. CapacityError when the first tier refuses.
    - `get` reads from the highest tier that has the key and promotes it to the first tier
      on a hit (best effort: a promotion that does not fit is skipped).
    - A tier that is down (TierUnavailableError) is skipped on reads and writes, never fatal.
    - `delete` removes the key from every tier; `pin` pins where it lives.
    - `move(key, tier, codec)` re-homes an object into `tier`, transcoded to `codec`.
    """

    def __init__(self, tiers: Sequence[Tier]) -> None:
        raise NotImplementedError

    def lookup(self, key: str) -> Location | None: ...
    def put(self, obj: StoredObject) -> None: ...
    def get(self, key: str) -> StoredObject | None: ...
    def delete(self, key: str) -> bool: ...
    def pin(self, key: str) -> bool: ...
    def unpin(self, key: str) -> bool: ...
    def move(self, key: str, tier: str, codec: str | None = None) -> Location: ...
    def stats(self) -> list[TierStats]: ...
    def close(self) -> None: ...
