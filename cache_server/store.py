"""TieredStore: the tiers in order (memory → disk → Redis) behind one interface."""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, TypeVar

from cache_server.admission import FrequencySketch
from cache_server.objects import ObjectMeta, StoredObject, check_key
from cache_server.tiers.base import MappedObject, Staged, Tier, TierStats
from cache_server.tiers.transcode import transcode
from cache_server.writeback import Background
from kvfuse.errors import CapacityError, ConfigError, InvalidRequestError, TierUnavailableError

T = TypeVar("T")
MAX_TOMBSTONES = 100_000  # per tier: deletes a down tier missed, replayed when it is back
# Why a put left an object in no tier (Placement.reason, PutResponse.reason).
ADMISSION = "admission"  # the first tier's admission declined it and no lower tier took it
CAPACITY = "capacity"  # a lower tier had no room for it
UNAVAILABLE = "unavailable"  # the lower tier that would have taken it is down


@dataclass(frozen=True)
class Location:
    """Where a key lives: the highest tier holding it and its metadata there."""

    tier: str
    meta: ObjectMeta
    pinned: bool


@dataclass(frozen=True)
class Placement:
    """Where a put left an object: the tier holding it and its size there, or why none does.

    Attributes:
        tier: the tier's name; None when no tier kept the object.
        nbytes: the object's encoded size in that tier (its codec may differ); 0 if not stored.
        reason: "" when stored, else ADMISSION, CAPACITY or UNAVAILABLE.
    """

    tier: str | None
    nbytes: int = 0
    reason: str = ""

    @property
    def stored(self) -> bool:
        return self.tier is not None


@dataclass(frozen=True)
class DrainReport:
    """What `drain` did: objects copied down, found below already, and not copied."""

    num_copied: int
    num_present: int
    num_left: int


class _Landing(NamedTuple):
    """Where an object ended up inside the store: a tier index (len(tiers): none), its
    metadata there (None when dropped) and, when dropped, why."""

    idx: int
    meta: ObjectMeta | None
    reason: str


@dataclass(frozen=True)
class StoreCounters:
    """Store-level counters since start (tier-level ones are in TierStats).

    Attributes:
        num_hits: reads served, per tier name.
        num_misses: reads no tier could serve.
        num_promotions: objects copied up into the first tier after a hit below it.
        num_demotions: evicted (or declined) objects stored into a lower tier.
        num_write_backs: first-tier objects copied into the second tier ahead of eviction.
        num_dropped: evicted objects no lower tier took (off the end of the chain).
        num_transcodes: objects re-encoded to another codec.
        num_unavailable: calls that found a tier down and skipped it, per tier name.
    """

    num_hits: dict[str, int]
    num_misses: int
    num_promotions: int
    num_demotions: int
    num_write_backs: int
    num_dropped: int
    num_transcodes: int
    num_unavailable: dict[str, int]


def _get_layer(tier: Tier, key: str, layer_idx: int) -> bytes | None:
    return tier.get_layer(key, layer_idx)


class TieredStore:
    """Tiers ordered fastest first, typically memory → disk → Redis. Thread-safe.

    - `put` stores into the first tier (transcoded to its codec); if that tier refuses
      (CapacityError) or is down, the next tiers are tried, and the key is removed from every
      other tier so no stale copy remains. CapacityError if no tier takes it. It returns a
      `Placement`: the tier that kept the object, or why none did (its admission declined it
      and the tiers below could not take it).
    - Objects a tier evicts (or declines through admission) are demoted to the next tier that
      takes them, transcoded to its codec (skipped when it already holds the same object); off
      the end they are dropped.
    - `get` reads from the highest tier that has the key and, from its `promote_after_hits`-th
      recent hit below the first tier on, promotes it into the first tier (best effort; the
      lower copy stays, so caching is inclusive). Pins travel with promotion. Waiting for a
      second hit keeps a scan of once-read objects from flushing the first tier.
      `get_or_map` does the same, but hands out an object a tier keeps in a file as views of
      that file, for sending it from the page cache without a copy.
    - Write-back (`write_back_from`): a background thread keeps the first tier's least
      recently used objects, the part of it above that fill fraction, copied into the second
      tier, so their eviction later writes nothing and puts do not wait on the disk.
    - A tier that is down (TierUnavailableError) is skipped, never fatal. Deletes it missed
      are remembered (tombstones) and replayed before it serves that key again.
    - `delete` removes the key from every tier; `pin`/`unpin` act on every tier holding it.
    - `move(key, tier, codec)` re-homes an object into `tier` (transcoded to `codec`, default
      the tier's) and removes it from all other tiers.
    - `drain(deadline)` (at shutdown) copies what only the first tier holds into the next
      tier that takes it, so objects held in memory survive a restart.

    Locking: one store lock serializes mutations (put, delete, pin, unpin, move, promotion
    and the demotions they cause), so concurrent puts of one key commit exactly one object
    and a delete cannot be undone by an in-flight demotion. Reads (lookup, get, get_layer),
    the transcoding of incoming objects and the write-back's file writes (`Tier.stage`) run
    outside the lock; each tier guards itself.

    Args:
        tiers: fastest first.
        promote_after_hits: recent hits below the first tier (a frequency sketch) before a
            `get` promotes the object; 1 promotes on every such hit.
        write_back_from: the first tier's fill fraction above which its least recently used
            objects are written back to the second tier; None (or one tier) disables it.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        promote_after_hits: int = 1,
        write_back_from: float | None = None,
    ) -> None:
        if not tiers:
            raise ConfigError("a store needs at least one tier")
        if len({t.name for t in tiers}) != len(tiers):
            raise ConfigError("tier names must be unique")
        if promote_after_hits < 1:
            raise ConfigError("promote_after_hits must be at least 1")
        if write_back_from is not None and not 0.0 <= write_back_from <= 1.0:
            raise ConfigError("write_back_from must be a fraction in [0, 1]")
        self.tiers: tuple[Tier, ...] = tuple(tiers)
        self._lock = threading.RLock()
        self._tombstones: list[OrderedDict[str, None]] = [OrderedDict() for _ in tiers]
        self._num_deletes = 0  # promotions that raced a delete are dropped
        self._counts: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._promote_after = promote_after_hits
        self._lower_hits = FrequencySketch()  # guarded by _count_lock
        self._write_back_from = write_back_from
        self._writer = (
            Background("kvfuse-write-back", self._write_back_all)
            if write_back_from is not None and len(self.tiers) > 1
            else None
        )

    def lookup(self, key: str) -> Location | None:
        """The highest tier holding `key` with its metadata; None on a miss. No promotion."""
        check_key(key)
        for idx, tier in enumerate(self.tiers):
            meta = self._read(idx, tier.get_meta, key)
            if meta is not None:
                return Location(tier.name, meta, bool(self._read(idx, tier.is_pinned, key)))
        return None

    def get(self, key: str) -> StoredObject | None:
        """The whole verified object from the highest tier that has it, or None."""
        found = self._find(key, map_files=False)
        assert not isinstance(found, MappedObject)
        return found

    def get_or_map(self, key: str) -> StoredObject | MappedObject | None:
        """Like `get`, but an object the highest tier keeps in a file comes back as views of
        it (`Tier.get_mapped`: verified, read from the page cache without a copy), unless
        this read promotes it. The caller closes it. For sending whole objects."""
        return self._find(key, map_files=True)

    def _find(self, key: str, map_files: bool) -> StoredObject | MappedObject | None:
        check_key(key)
        num_deletes = self._num_deletes
        for idx, tier in enumerate(self.tiers):
            view = self._read(idx, tier.get_mapped, key) if map_files else None
            obj = None if view is not None else self._read(idx, tier.get, key)
            if view is None and obj is None:
                continue
            self._count(f"hit:{tier.name}")
            if idx == 0 or not self._hit_below(key):
                return view or obj
            if view is not None:  # promoting: a copy is kept after all
                with view:
                    obj = StoredObject(view.meta, tuple(bytes(r) for r in view.layers))
            assert obj is not None
            self._promote(obj, idx, num_deletes)
            return obj
        self._count("miss")
        return None

    def _hit_below(self, key: str) -> bool:
        """Counts a hit below the first tier; True once `key` has had enough to be promoted."""
        if self._promote_after == 1:
            return True
        with self._count_lock:
            self._lower_hits.increment(key)
            return self._lower_hits.estimate(key) >= self._promote_after

    def get_layer(self, key: str, layer_idx: int, tier: str | None = None) -> bytes | None:
        """One verified layer record from `tier` (default: the highest that has it), or None.

        No promotion. A layer-by-layer reader should pass the tier `lookup` reported, so all
        its layers come from one copy.
        """
        check_key(key)
        for idx, t in enumerate(self.tiers):
            if tier is None or t.name == tier:
                record = self._read(idx, partial(_get_layer, t, layer_idx=layer_idx), key)
                if record is not None:
                    return record
        return None

    def keys(self) -> Iterator[str]:
        """Keys held by any reachable tier (a snapshot, sorted)."""
        found: set[str] = set()
        for idx, tier in enumerate(self.tiers):
            try:
                held = tier.keys()
                found.update(k for k in held if k not in self._tombstones[idx])
            except TierUnavailableError:
                self._count(f"unavailable:{tier.name}")
        return iter(sorted(found))

    def protect(self, keys: Sequence[str], ttl_s: float) -> int:
        """The placement's lease on the first tier: for `ttl_s`, eviction there passes over
        `keys` (replacing the previous lease); returns how many are covered."""
        for key in keys:
            check_key(key)
        return self.tiers[0].protect(keys, time.monotonic() + ttl_s)

    def keys_in(self, tier: str) -> list[str]:
        """Keys `tier` holds (a snapshot); InvalidRequestError for an unknown tier."""
        names = [t.name for t in self.tiers]
        if tier not in names:
            raise InvalidRequestError(f"unknown tier {tier!r}; the store has {names}")
        idx = names.index(tier)
        try:
            held = self.tiers[idx].keys()  # a Tier method, not a dict's
            return [k for k in held if k not in self._tombstones[idx]]
        except TierUnavailableError:
            self._count(f"unavailable:{tier}")
            return []

    def stats(self) -> list[TierStats]:
        """One snapshot per tier, fastest first (down tiers report up=False)."""
        return [tier.stats() for tier in self.tiers]

    def counters(self) -> StoreCounters:
        with self._count_lock:
            counts = dict(self._counts)

        def per_tier(prefix: str) -> dict[str, int]:
            return {t.name: counts.get(f"{prefix}:{t.name}", 0) for t in self.tiers}

        return StoreCounters(
            num_hits=per_tier("hit"),
            num_misses=counts.get("miss", 0),
            num_promotions=counts.get("promotion", 0),
            num_demotions=counts.get("demotion", 0),
            num_write_backs=counts.get("write_back", 0),
            num_dropped=counts.get("dropped", 0),
            num_transcodes=counts.get("transcode", 0),
            num_unavailable=per_tier("unavailable"),
        )

    def put(self, obj: StoredObject) -> Placement:
        """Stores `obj` (its CRC32s must already be verified, as the servicer's upload does).

        Returns where it landed, or why no tier kept it. Raises CapacityError when every tier
        refuses it, TierUnavailableError when none is reachable.
        """
        first = self._transcode(obj, self.tiers[0].codec)  # outside the lock: CPU-heavy
        refused: CapacityError | None = None
        with self._lock:
            for idx, tier in enumerate(self.tiers):
                copy = first if idx == 0 else self._transcode(obj, tier.codec)
                try:
                    landed = self._store_into(idx, copy)
                except CapacityError as exc:
                    refused = refused or exc
                    continue
                if landed is not None:
                    self._drop_other_copies(obj.meta.key, landed.idx)
                    self._wake_writer()
                    return self._placement(landed)
        raise refused or TierUnavailableError("no tier is reachable")

    def write_back(self, from_fraction: float) -> int:
        """Copies the first tier's least recently used objects into the second tier, those
        beyond `from_fraction` of its capacity (by size in the first tier), unless the
        second tier holds them already; returns how many it copied.

        Each copy is written outside the store lock (`Tier.stage`) and committed under it,
        only if the first tier still holds that very object (not deleted or replaced
        meanwhile). The first tier keeps its copy; evicting it later finds the second
        tier's and writes nothing. The background writer calls this after puts.
        """
        if len(self.tiers) < 2:
            return 0
        first = self.tiers[0]
        try:
            stats = first.stats()
            keys = list(first.keys())  # least recently used first (as `drain` relies on)
        except TierUnavailableError:
            return 0
        excess = stats.stored_bytes - int(from_fraction * stats.capacity_bytes)
        if excess <= 0:
            return 0
        # metadata only: holding the objects would keep evicted ones alive for the whole pass
        metas = [meta for key in keys if (meta := self._read(0, first.get_meta, key))]
        # the tier accounts more than the records (metadata, overhead): take the same share
        excess = excess * sum(m.total_nbytes for m in metas) // max(1, stats.stored_bytes)
        num_copied = 0
        for meta in metas:
            if excess <= 0:
                break
            excess -= meta.total_nbytes
            obj = self._read(0, first.peek, meta.key)
            if obj is not None and obj.meta == meta:
                num_copied += self._write_back_one(obj)
        return num_copied

    def _write_back_one(self, obj: StoredObject) -> bool:
        key, below = obj.meta.key, self.tiers[1]
        copy = self._transcode(obj, below.codec)
        if self._read(1, below.get_meta, key) == copy.meta:
            return False  # clean already
        try:
            staged = below.stage(copy)
        except (CapacityError, TierUnavailableError):
            return False
        try:
            with self._lock:
                if self._read(0, self.tiers[0].get_meta, key) != obj.meta:
                    return False  # deleted or replaced while we wrote: the copy is stale
                landed = self._store_into(1, copy, staged=staged)
        except CapacityError:
            return False
        finally:
            below.discard(staged)
        if landed is None or landed.idx != 1:
            return False
        self._count("write_back")
        return True

    def _write_back_all(self) -> None:
        if self._write_back_from is not None:
            self.write_back(self._write_back_from)

    def _wake_writer(self) -> None:
        if self._writer is not None:
            self._writer.notify()

    def _placement(self, landed: _Landing) -> Placement:
        if landed.idx >= len(self.tiers) or landed.meta is None:
            return Placement(None, 0, landed.reason)
        return Placement(self.tiers[landed.idx].name, landed.meta.total_nbytes)

    def delete(self, key: str) -> bool:
        """Removes `key` from every tier (pinned or not); True if any tier had it."""
        check_key(key)
        with self._lock:
            self._num_deletes += 1
            return self._delete_except(key, None)

    def pin(self, key: str) -> bool:
        """Pins `key` in every reachable tier holding it; True if any does."""
        check_key(key)
        with self._lock:
            return any([bool(self._read(i, t.pin, key)) for i, t in enumerate(self.tiers)])

    def unpin(self, key: str) -> bool:
        """Lifts the pin everywhere; True if any tier had it pinned."""
        check_key(key)
        with self._lock:
            return any([bool(self._read(i, t.unpin, key)) for i, t in enumerate(self.tiers)])

    def move(self, key: str, tier: str, codec: str | None = None) -> Location | None:
        """Re-homes `key` into `tier` as `codec` (default: the tier's); None if no tier has it.

        Raises InvalidRequestError for an unknown tier, CodecError for an unknown codec,
        CapacityError if the target refuses (nothing changes), TierUnavailableError if the
        target is down.
        """
        check_key(key)
        names = [t.name for t in self.tiers]
        if tier not in names:
            raise InvalidRequestError(f"unknown tier {tier!r}; the store has {names}")
        idx = names.index(tier)
        target = self.tiers[idx]
        with self._lock:
            found = self._get_highest(key)
            if found is None:
                return None
            tiers = enumerate(self.tiers)
            pinned = any([bool(self._read(i, t.is_pinned, key)) for i, t in tiers])
            copy = self._transcode(found[1], codec or target.codec)
            evicted = target.put(copy)
            if any(e is copy for e in evicted):
                raise CapacityError(f"{tier} tier declined {key}: its victims are hotter")
            self._tombstones[idx].pop(key, None)
            if pinned:
                target.pin(key)
            self._delete_except(key, idx)
            self._demote(evicted, idx)
            return Location(target.name, copy.meta, pinned)

    def drain(self, deadline: float) -> DrainReport:
        """Copies every object only the first tier holds into the next tier that takes it.

        For a shutdown: a memory tier forgets everything at exit, the disk keeps it (Redis
        too, as long as it runs). Most recently used first, so a drain cut short keeps the
        objects most likely to be read again, and no more than the next tier's capacity (by
        their size in the first tier), so the copies do not evict each other; pins go along.
        Starts no copy after `deadline` (time.monotonic()). The first tier keeps its copies.
        Nothing happens with one tier.
        """
        if len(self.tiers) == 1:
            return DrainReport(0, 0, 0)
        first, room = self.tiers[0], self.tiers[1].stats().capacity_bytes
        copied = present = left = 0
        for key in reversed(list(first.keys())):  # keys() lists least recently used first
            meta = self._read(0, first.get_meta, key)
            if meta is None:
                continue  # deleted meanwhile
            if time.monotonic() >= deadline or meta.total_nbytes > room:
                left += 1
                continue
            with self._lock:
                outcome = self._drain_one(key)
            if outcome == "copied":
                copied += 1
                room -= meta.total_nbytes
            present += outcome == "present"
            left += outcome == "left"
        return DrainReport(copied, present, left)

    def _drain_one(self, key: str) -> str:
        """What became of `key`: copied, present (a lower tier has it) or left. Under the lock."""
        obj = self._read(0, self.tiers[0].get, key)
        if obj is None:
            return "present"  # deleted or evicted (and demoted) meanwhile
        below = range(1, len(self.tiers))
        if any(self._read(i, self.tiers[i].get_meta, key) is not None for i in below):
            return "present"
        landed = self._demote_one(obj, 0)
        if landed.idx >= len(self.tiers):
            return "left"
        if self._read(0, self.tiers[0].is_pinned, key):
            self._read(landed.idx, self.tiers[landed.idx].pin, key)
        return "copied"

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        for tier in self.tiers:
            tier.close()

    def _get_highest(self, key: str) -> tuple[int, StoredObject] | None:
        for idx, tier in enumerate(self.tiers):
            obj = self._read(idx, tier.get, key)
            if obj is not None:
                return idx, obj
        return None

    def _store_into(
        self, idx: int, obj: StoredObject, pin: bool = False, staged: Staged | None = None
    ) -> _Landing | None:
        """Puts `obj` into tier `idx` (committing `staged`, its stage there, if given) and
        demotes what it evicts.

        Returns where `obj` is now: tier `idx`, or a lower one if admission declined it, or
        len(tiers) with the reason if it was dropped; None if tier `idx` is down. Raises
        CapacityError if the tier refuses.
        """
        tier = self.tiers[idx]
        try:
            evicted = tier.put(obj) if staged is None else tier.commit(staged)
        except TierUnavailableError:
            self._count(f"unavailable:{tier.name}")
            return None
        if any(e is obj for e in evicted):  # declined: it goes down the chain like an evictee
            self._demote([e for e in evicted if e is not obj], idx)
            return self._demote_one(obj, idx, ADMISSION)
        self._tombstones[idx].pop(obj.meta.key, None)
        if pin:
            self._read(idx, tier.pin, obj.meta.key)
        self._demote(evicted, idx)
        return _Landing(idx, obj.meta, "")

    def _demote(self, evicted: list[StoredObject], from_idx: int) -> None:
        for victim in evicted:
            self._demote_one(victim, from_idx)

    def _demote_one(self, victim: StoredObject, from_idx: int, reason: str = "") -> _Landing:
        """Stores `victim` into the first lower tier that takes it.

        Returns that tier's index and the copy's metadata, or len(tiers) and why none took it
        (`reason` when there is no lower tier, else the last lower tier's refusal).
        """
        for idx in range(from_idx + 1, len(self.tiers)):
            tier = self.tiers[idx]
            copy = self._transcode(victim, tier.codec)
            if self._read(idx, tier.get_meta, victim.meta.key) == copy.meta:
                return _Landing(idx, copy.meta, "")  # already there (inclusive caching)
            try:
                landed = self._store_into(idx, copy)
            except CapacityError:
                reason = CAPACITY
                continue
            if landed is None:
                reason = UNAVAILABLE
                continue
            self._count("demotion")
            return landed
        self._count("dropped")
        return _Landing(len(self.tiers), None, reason)

    def _promote(self, obj: StoredObject, from_idx: int, num_deletes: int) -> None:
        key = obj.meta.key
        copy = self._transcode(obj, self.tiers[0].codec)
        with self._lock:
            if self._num_deletes != num_deletes:
                return  # a delete ran since we read `obj`: never resurrect it
            pinned = bool(self._read(from_idx, self.tiers[from_idx].is_pinned, key))
            try:
                landed = self._store_into(0, copy, pin=pinned)
            except CapacityError:
                return
            if landed is not None and landed.idx == 0:
                self._count("promotion")
                self._wake_writer()

    def _drop_other_copies(self, key: str, landed: int) -> None:
        """After a put: deletes older copies of `key` in other tiers, keeping their pin."""
        others = [i for i in range(len(self.tiers)) if i != landed]
        pinned = any([bool(self._read(i, self.tiers[i].is_pinned, key)) for i in others])
        self._delete_except(key, landed)
        if pinned and landed < len(self.tiers):
            self._read(landed, self.tiers[landed].pin, key)

    def _delete_except(self, key: str, keep_idx: int | None) -> bool:
        found = False
        for idx, tier in enumerate(self.tiers):
            if idx == keep_idx:
                continue
            try:
                found |= tier.delete(key)
                self._tombstones[idx].pop(key, None)
            except TierUnavailableError:
                self._count(f"unavailable:{tier.name}")
                self._tombstones[idx][key] = None
                if len(self._tombstones[idx]) > MAX_TOMBSTONES:
                    self._tombstones[idx].popitem(last=False)
        return found

    def _read(self, idx: int, call: Callable[[str], T], key: str) -> T | None:
        """`call(key)` on tier `idx`; None if the tier is down or still owes a delete of key."""
        if key in self._tombstones[idx] and not self._replay_delete(idx, key):
            return None
        try:
            return call(key)
        except TierUnavailableError:
            self._count(f"unavailable:{self.tiers[idx].name}")
            return None

    def _replay_delete(self, idx: int, key: str) -> bool:
        """Replays a delete tier `idx` missed; True once the tier no longer holds `key`."""
        with self._lock:
            if key not in self._tombstones[idx]:
                return True
            try:
                self.tiers[idx].delete(key)
            except TierUnavailableError:
                return False
            self._tombstones[idx].pop(key, None)
            return True

    def _transcode(self, obj: StoredObject, codec: str) -> StoredObject:
        copy = transcode(obj, codec)
        if copy is not obj:
            self._count("transcode")
        return copy

    def _count(self, name: str) -> None:
        with self._count_lock:
            self._counts[name] += 1
