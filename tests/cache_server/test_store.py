"""TieredStore over real tiers: demotion, promotion, pins, move, transcoding, outages, races."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from cache_server.objects import ObjectMeta, StoredObject
from cache_server.store import ADMISSION, CAPACITY, DrainReport, Placement, TieredStore
from cache_server.tiers import diskfile
from cache_server.tiers.base import MappedObject
from cache_server.tiers.disk import DiskTier
from cache_server.tiers.memory import MemoryTier, held_nbytes
from cache_server.tiers.redis_tier import RedisTier
from cache_server.tiers.transcode import transcode
from kvfuse.codecs import get_codec
from kvfuse.errors import CapacityError, ConfigError, InvalidRequestError
from kvfuse.transport.crc import crc32

Make = Callable[..., StoredObject]
NUM_TOKENS, NUM_HEADS, HEAD_DIM, NUM_LAYERS = 16, 2, 8, 3


def kv_object(seed: int, codec: str = "raw") -> tuple[StoredObject, list[torch.Tensor]]:
    """An object whose records really encode K/V; returns it and the K tensors per layer."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_TOKENS, NUM_HEADS, HEAD_DIM)
    ks = [torch.randn(shape, generator=gen) for _ in range(NUM_LAYERS)]
    layers = [get_codec(codec).encode(k, -k, i, NUM_LAYERS) for i, k in enumerate(ks)]
    meta = ObjectMeta(
        key=hashlib.sha256(f"kv{seed}".encode()).hexdigest(),
        num_layers=NUM_LAYERS,
        num_tokens=NUM_TOKENS,
        num_kv_heads=NUM_HEADS,
        head_dim=HEAD_DIM,
        dtype="float32",
        codec=codec,
        position_offset=0,
        layer_nbytes=tuple(len(r) for r in layers),
        layer_crc32=tuple(crc32(r) for r in layers),
    )
    return StoredObject(meta, tuple(layers)), ks


@pytest.fixture
def build(tmp_path: Path, redis_server: Any, objects: Make) -> Iterator[Callable[..., TieredStore]]:
    """`build(memory_objs, disk_objs, redis_objs, ...)`: a three-tier store, each tier sized
    in objects like `sample` (default: `objects(0)`); None leaves a tier out."""
    stores: list[TieredStore] = []

    def make(
        memory_objs: float = 4.5,
        disk_objs: float | None = 4.5,
        redis_objs: float | None = 100,
        memory_codec: str = "raw",
        disk_codec: str = "raw",
        redis_codec: str = "raw",
        admission: bool = False,
        sample: StoredObject | None = None,
    ) -> TieredStore:
        sample = sample or objects(0)
        disk_unit = len(diskfile.encode_header(sample.meta)) + sample.meta.total_nbytes
        redis_unit = len(sample.meta.to_bytes()) + sample.meta.total_nbytes
        tiers: list[Any] = [
            MemoryTier(
                int(held_nbytes(sample) * memory_objs),
                high_watermark=1.0,
                low_watermark=1.0,
                codec=memory_codec,
                admission=admission,
            )
        ]
        if disk_objs is not None:
            disk_bytes = int(disk_unit * disk_objs)
            tiers.append(DiskTier(tmp_path / "disk", disk_bytes, codec=disk_codec, fsync=False))
        if redis_objs is not None:
            tiers.append(
                RedisTier(
                    redis_server.url,
                    int(redis_unit * redis_objs),
                    codec=redis_codec,
                    timeout_s=0.2,
                    retry_interval_s=0.0,
                )
            )
        stores.append(TieredStore(tiers))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def tier_of(store: TieredStore, obj: StoredObject) -> str | None:
    location = store.lookup(obj.meta.key)
    return None if location is None else location.tier


def test_put_lookup_get_delete(build: Callable[..., TieredStore], objects: Make) -> None:
    store = build()
    obj = objects("a")
    store.put(obj)
    location = store.lookup(obj.meta.key)
    assert location is not None and (location.tier, location.meta, location.pinned) == (
        "memory",
        obj.meta,
        False,
    )
    assert store.get(obj.meta.key) == obj
    assert store.get_layer(obj.meta.key, 1) == obj.layers[1]
    assert store.delete(obj.meta.key) and not store.delete(obj.meta.key)
    assert store.lookup(obj.meta.key) is None and store.get(obj.meta.key) is None
    counters = store.counters()
    assert counters.num_hits["memory"] == 1 and counters.num_misses == 1


def test_evictions_cascade_down_all_three_tiers_and_off_the_end(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=2.5, disk_objs=3.5, redis_objs=4.5)
    for seed in range(12):
        store.put(objects(seed))
    tiers = [tier_of(store, objects(seed)) for seed in range(12)]
    assert tiers == [None] * 3 + ["redis"] * 4 + ["disk"] * 3 + ["memory"] * 2
    assert store.counters().num_dropped == 3
    for stats in store.stats():
        assert stats.stored_bytes <= stats.capacity_bytes
    assert sorted(store.keys()) == sorted(objects(s).meta.key for s in range(3, 12))


def test_hits_below_are_promoted_and_copies_stay_below(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=2.5, disk_objs=3.5, redis_objs=4.5)
    for seed in range(9):
        store.put(objects(seed))
    assert tier_of(store, objects(0)) == "redis"
    assert store.get(objects(0).meta.key) == objects(0)
    assert tier_of(store, objects(0)) == "memory"
    assert store.tiers[2].get_meta(objects(0).meta.key) is not None  # inclusive
    on_disk = next(seed for seed in range(9) if tier_of(store, objects(seed)) == "disk")
    assert store.get(objects(on_disk).meta.key) == objects(on_disk)
    assert tier_of(store, objects(on_disk)) == "memory"
    counters = store.counters()
    assert counters.num_promotions == 2
    assert counters.num_hits == {"memory": 0, "disk": 1, "redis": 1}


def test_get_or_map_maps_disk_objects_until_a_read_promotes_them(
    tmp_path: Path, objects: Make
) -> None:
    unit = len(diskfile.encode_header(objects(0).meta)) + objects(0).meta.total_nbytes
    memory = MemoryTier(int(held_nbytes(objects(0)) * 1.5), high_watermark=1.0, low_watermark=1.0)
    store = TieredStore([memory, DiskTier(tmp_path, unit * 10, fsync=False)], promote_after_hits=2)
    for seed in range(3):
        store.put(objects(seed))
    assert store.get_or_map(objects("missing").meta.key) is None
    in_memory = store.get_or_map(objects(2).meta.key)
    assert isinstance(in_memory, StoredObject) and in_memory == objects(2)
    mapped = store.get_or_map(objects(0).meta.key)  # first hit below: mapped, not promoted
    assert isinstance(mapped, MappedObject)
    with mapped:
        assert StoredObject(mapped.meta, tuple(bytes(r) for r in mapped.layers)) == objects(0)
    assert tier_of(store, objects(0)) == "disk"
    promoted = store.get_or_map(objects(0).meta.key)  # second hit: promoted, a copy
    assert isinstance(promoted, StoredObject) and promoted == objects(0)
    assert tier_of(store, objects(0)) == "memory"
    counters = store.counters()
    assert counters.num_hits == {"memory": 1, "disk": 2} and counters.num_promotions == 1
    assert counters.num_misses == 1
    store.close()


def test_pinned_objects_stay_and_pins_follow_promotion(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=2.5, disk_objs=2.5, redis_objs=None)
    store.put(objects("pinned"))
    assert store.pin(objects("pinned").meta.key)
    assert not store.pin(objects("absent").meta.key)
    for seed in range(10):
        store.put(objects(seed))
    location = store.lookup(objects("pinned").meta.key)
    assert location is not None and location.tier == "memory" and location.pinned
    store.move(objects("pinned").meta.key, "disk")
    assert store.get(objects("pinned").meta.key) is not None  # promoted, pin carried
    location = store.lookup(objects("pinned").meta.key)
    assert location is not None and location.tier == "memory" and location.pinned
    assert store.unpin(objects("pinned").meta.key)
    location = store.lookup(objects("pinned").meta.key)
    assert location is not None and not location.pinned


def test_replacing_a_pinned_key_keeps_the_pin(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build()
    old = objects("old")
    store.put(old)
    store.move(old.meta.key, "disk")
    store.pin(old.meta.key)
    new = StoredObject(replace(objects("new").meta, key=old.meta.key), objects("new").layers)
    store.put(new)
    location = store.lookup(old.meta.key)
    assert location is not None and (location.tier, location.pinned) == ("memory", True)
    assert store.tiers[1].get_meta(old.meta.key) is None


def test_put_falls_through_when_the_first_tier_is_full_of_pins(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=2.5, redis_objs=None)
    for seed in range(2):
        store.put(objects(seed))
        store.pin(objects(seed).meta.key)
    store.put(objects("next"))
    assert tier_of(store, objects("next")) == "disk"
    only_memory = build(memory_objs=1.5, disk_objs=None, redis_objs=None)
    only_memory.put(objects(0))
    only_memory.pin(objects(0).meta.key)
    with pytest.raises(CapacityError):
        only_memory.put(objects(1))


def test_admission_declined_puts_land_one_tier_down(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=2.5, redis_objs=None, admission=True)
    for seed in range(2):
        store.put(objects(seed))
        for _ in range(3):
            store.get(objects(seed).meta.key)
    store.put(objects("one-off"))
    assert tier_of(store, objects("one-off")) == "disk"
    assert [tier_of(store, objects(s)) for s in range(2)] == ["memory", "memory"]


def test_put_reports_where_the_object_landed_or_why_no_tier_kept_it(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    def hot(store: TieredStore) -> None:
        for seed in range(2):
            store.put(objects(seed))
            for _ in range(3):
                store.get(objects(seed).meta.key)

    two = build(memory_objs=2.5, disk_objs=1.5, redis_objs=None, admission=True)
    assert two.put(objects("first")) == Placement("memory", objects("first").meta.total_nbytes)
    two.delete(objects("first").meta.key)
    hot(two)
    size = objects("x").meta.total_nbytes
    assert two.put(objects("one-off")) == Placement("disk", size)  # declined, one tier down
    two.pin(objects("one-off").meta.key)  # the disk has no room left but for pins
    assert two.put(objects("another")) == Placement(None, 0, CAPACITY)
    alone = build(memory_objs=2.5, disk_objs=None, redis_objs=None, admission=True)
    hot(alone)
    placement = alone.put(objects("one-off"))
    assert placement == Placement(None, 0, ADMISSION) and not placement.stored
    assert alone.lookup(objects("one-off").meta.key) is None


def test_drain_copies_what_only_memory_holds_with_its_pins(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=4.5, disk_objs=10, redis_objs=None)
    for seed in range(4):
        store.put(objects(seed))
    store.pin(objects(1).meta.key)
    store.move(objects(3).meta.key, "disk")
    store.get(objects(3).meta.key)  # promoted back: memory and disk both hold it
    assert store.drain(time.monotonic() - 1) == DrainReport(0, 0, 4)  # past the deadline
    assert store.drain(time.monotonic() + 60) == DrainReport(3, 1, 0)
    disk = store.tiers[1]
    assert all(disk.get(objects(seed).meta.key) == objects(seed) for seed in range(4))
    assert disk.is_pinned(objects(1).meta.key) and not disk.is_pinned(objects(0).meta.key)
    assert [tier_of(store, objects(s)) for s in range(4)] == ["memory"] * 4  # memory keeps them
    alone = build(memory_objs=4.5, disk_objs=None, redis_objs=None)
    alone.put(objects(0))
    assert alone.drain(time.monotonic() + 60) == DrainReport(0, 0, 0)


def test_drain_copies_no_more_than_the_next_tier_holds_most_recent_first(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    big = [objects(seed, layer_nbytes=64 << 10) for seed in range(3)]  # headers negligible
    small = build(memory_objs=4.5, disk_objs=2.5, redis_objs=None, sample=big[0])
    for obj in big:
        small.put(obj)
    assert small.drain(time.monotonic() + 60) == DrainReport(2, 0, 1)  # room for two
    drained = [small.tiers[1].get_meta(obj.meta.key) is not None for obj in big]
    assert drained == [False, True, True]  # the most recently used ones


def test_put_replaces_stale_copies_in_every_tier(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build()
    old = objects("old")
    store.put(old)
    store.move(old.meta.key, "redis")
    new = StoredObject(replace(objects("new").meta, key=old.meta.key), objects("new").layers)
    store.put(new)
    assert store.tiers[2].get_meta(old.meta.key) is None
    assert store.get(old.meta.key) == new


def test_delete_removes_every_copy(build: Callable[..., TieredStore], objects: Make) -> None:
    store = build(memory_objs=2.5)
    for seed in range(4):
        store.put(objects(seed))
    store.get(objects(0).meta.key)  # promoted: now in memory and on disk
    store.pin(objects(0).meta.key)
    assert store.delete(objects(0).meta.key)
    assert all(t.get_meta(objects(0).meta.key) is None for t in store.tiers)


def test_move_rehomes_and_transcodes(build: Callable[..., TieredStore]) -> None:
    store = build()
    obj, ks = kv_object(1)
    store.put(obj)
    location = store.move(obj.meta.key, "redis", "int8")
    assert location is not None and location.tier == "redis" and location.meta.codec == "int8"
    assert [t.get_meta(obj.meta.key) is not None for t in store.tiers] == [False, False, True]
    stored = store.tiers[2].get(obj.meta.key)
    assert stored is not None and stored.meta.codec == "int8"
    assert stored.meta.total_nbytes < obj.meta.total_nbytes
    k, v = get_codec("int8").decode(stored.layers[2])
    torch.testing.assert_close(k, ks[2], atol=0.05, rtol=0.0)
    torch.testing.assert_close(v, -ks[2], atol=0.05, rtol=0.0)  # int8: ~1% of the range
    assert store.move("f" * 64, "disk") is None
    with pytest.raises(InvalidRequestError):
        store.move(obj.meta.key, "tape")


def test_tiers_with_other_codecs_transcode_on_demotion_and_promotion(
    build: Callable[..., TieredStore],
) -> None:
    first, ks = kv_object(1)
    store = build(memory_objs=1.5, disk_codec="fp16", redis_objs=None, sample=first)
    store.put(first)
    store.put(kv_object(2)[0])  # evicts `first` from memory: demoted to disk as fp16
    on_disk = store.tiers[1].get(first.meta.key)
    assert on_disk is not None and on_disk.meta.codec == "fp16"
    promoted = store.get(first.meta.key)  # read from disk (fp16), promoted as raw
    assert promoted is not None and promoted.meta.codec == "fp16"
    in_memory = store.tiers[0].get(first.meta.key)
    assert in_memory is not None and in_memory.meta.codec == "raw"
    k, v = get_codec("raw").decode(in_memory.layers[0])
    torch.testing.assert_close(k, ks[0], atol=2e-3, rtol=1e-3)  # fp16 rounding
    torch.testing.assert_close(v, -ks[0], atol=2e-3, rtol=1e-3)
    # first → fp16 (demoted), fp16 → raw (promoted), the second object → fp16 (demoted)
    assert store.counters().num_transcodes == 3


def test_transcode_is_identity_for_the_same_codec() -> None:
    obj, _ = kv_object(3)
    assert transcode(obj, "raw") is obj
    int4 = transcode(obj, "int4")
    assert int4.meta.codec == "int4" and int4.meta.key == obj.meta.key
    int4.verify()


def test_redis_down_store_keeps_serving_then_recovers(
    build: Callable[..., TieredStore],
    objects: Make,
    redis_server: Any,
    poll: Callable[..., bool],
) -> None:
    store = build(memory_objs=2.5, disk_objs=2.5, redis_objs=100)
    for seed in range(6):
        store.put(objects(seed))
    assert tier_of(store, objects(0)) == "redis"
    redis_server.stop()
    for seed in range(6, 10):
        store.put(objects(seed))  # demotions into Redis fail: dropped, never fatal
    assert store.get(objects(9).meta.key) == objects(9)
    assert store.get(objects(6).meta.key) == objects(6)  # from disk
    assert store.get(objects(0).meta.key) is None  # it was only in Redis
    redis = next(s for s in store.stats() if s.name == "redis")
    assert not redis.up
    assert store.counters().num_unavailable["redis"] > 0
    redis_server.start()

    def redis_back() -> bool:
        store.put(objects(f"probe{poll_round.pop()}"))
        return next(s for s in store.stats() if s.name == "redis").up

    poll_round = list(range(1000))
    assert poll(redis_back)
    for seed in range(20, 30):
        store.put(objects(seed))
    assert "redis" in {tier_of(store, objects(seed)) for seed in range(20, 30)}


def test_deletes_missed_by_a_down_tier_are_replayed(
    build: Callable[..., TieredStore], objects: Make, redis_server: Any
) -> None:
    store = build()
    obj = objects("secret")
    store.put(obj)
    store.move(obj.meta.key, "redis")
    redis_server.pause()  # unreachable: the DEL times out
    try:
        assert not store.delete(obj.meta.key)  # no reachable tier had it
    finally:
        redis_server.resume()
    store.tiers[2].put(obj)  # as if the DEL had never reached Redis
    assert store.lookup(obj.meta.key) is None  # the tombstone hides it and replays the delete
    assert not redis_server.client().exists(f"kvfuse:{{{obj.meta.key}}}")
    assert store.get(obj.meta.key) is None


def test_concurrent_puts_of_one_key_commit_exactly_one_object(
    build: Callable[..., TieredStore], objects: Make
) -> None:
    store = build(memory_objs=3.5, disk_objs=3.5)
    key = objects("same").meta.key
    versions = [
        StoredObject(replace(v.meta, key=key), v.layers)
        for v in (objects(i, layer_nbytes=250 + i) for i in range(6))
    ]
    errors: list[BaseException] = []

    def writer(idx: int) -> None:
        try:
            for round_idx in range(20):
                store.put(versions[(idx + round_idx) % len(versions)])
                store.put(objects(f"filler{idx}-{round_idx}"))  # forces demotions meanwhile
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        obj = store.get(key)
        assert obj is None or obj in versions
    for thread in threads:
        thread.join()
    assert errors == []
    final = store.get(key)
    assert final in versions
    holders = [t.name for t in store.tiers if t.get_meta(key) is not None]
    assert all(t.get(key) == final for t in store.tiers if t.name in holders)
    for tier in store.tiers[:2]:
        assert isinstance(tier, (MemoryTier, DiskTier))  # build's first two tiers
        tier.check_integrity()


def test_rejects_bad_tier_lists(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TieredStore([])
    with pytest.raises(ConfigError):
        TieredStore([MemoryTier(100), MemoryTier(100)])
