"""MemoryTier: budget and watermarks, LRU order, TinyLFU admission, pins, RAM accounting."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from collections.abc import Callable

import pytest

from cache_server.objects import StoredObject
from cache_server.tiers.memory import MemoryTier, held_nbytes
from kvfuse.errors import CapacityError, ConfigError, InvalidObjectError

Make = Callable[..., StoredObject]


def sized_tier(objects: Make, num_objects: int, **kwargs: object) -> MemoryTier:
    """A tier whose high watermark holds `num_objects` default-sized objects, not one more.

    Sizes differ by a few bytes between objects (CRC ints), hence half an object of slack.
    """
    unit = held_nbytes(objects(0))
    high = kwargs.get("high_watermark", 1.0)
    assert isinstance(high, float)
    return MemoryTier(int(unit * (num_objects + 0.5) / high), **kwargs)  # type: ignore[arg-type]


def test_budget_never_exceeded_when_filled_far_past_it(objects: Make) -> None:
    tier = MemoryTier(64 * 1024, high_watermark=0.9, low_watermark=0.6)
    for seed in range(2000):
        tier.put(objects(seed, layer_nbytes=100 + seed % 900))
        stats = tier.stats()
        assert stats.stored_bytes <= tier.high_bytes <= stats.capacity_bytes
    tier.check_integrity()
    assert tier.stats().num_evictions > 1000


def test_evicts_least_recently_used_first(objects: Make) -> None:
    tier = sized_tier(objects, 4, high_watermark=1.0, low_watermark=1.0, admission=False)
    for seed in range(4):
        assert tier.put(objects(seed)) == []
    assert tier.get(objects(0).meta.key) is not None  # 0 becomes the most recent
    assert tier.get_layer(objects(1).meta.key, 0) is not None  # layer 0 counts as access
    evicted = tier.put(objects(4))
    assert [o.meta.key for o in evicted] == [objects(2).meta.key]
    evicted = tier.put(objects(5))
    assert [o.meta.key for o in evicted] == [objects(3).meta.key]
    assert tier.get_meta(objects(0).meta.key) is not None


def test_get_meta_is_not_an_access(objects: Make) -> None:
    tier = sized_tier(objects, 2, high_watermark=1.0, low_watermark=1.0, admission=False)
    tier.put(objects(0))
    tier.put(objects(1))
    assert tier.get_meta(objects(0).meta.key) is not None
    assert [o.meta.key for o in tier.put(objects(2))] == [objects(0).meta.key]


def test_crossing_high_watermark_evicts_down_to_low(objects: Make) -> None:
    tier = sized_tier(objects, 10, high_watermark=1.0, low_watermark=0.5, admission=False)
    for seed in range(10):
        assert tier.put(objects(seed)) == []  # up to the high watermark: no eviction
    evicted = tier.put(objects(10))
    assert len(evicted) == 6  # 11 objects down to 5 (= low watermark) in one batch
    assert tier.stats().stored_bytes <= tier.low_bytes
    for seed in range(11, 15):
        assert tier.put(objects(seed)) == []  # the headroom absorbs the next puts


def test_admission_protects_hot_keys_from_a_scan(objects: Make) -> None:
    hot = [objects(f"hot{i}") for i in range(4)]

    def survivors(admission: bool) -> int:
        tier = sized_tier(objects, 8, high_watermark=1.0, low_watermark=1.0, admission=admission)
        for obj in hot:
            tier.put(obj)
        for _ in range(5):
            for obj in hot:
                assert tier.get(obj.meta.key) is not None
        for seed in range(100):  # one-off keys, far more than the tier holds
            tier.put(objects(seed))
        tier.check_integrity()
        return sum(tier.get_meta(obj.meta.key) is not None for obj in hot)

    assert survivors(admission=False) == 0  # plain LRU: the scan flushes them
    assert survivors(admission=True) == len(hot)


def test_declined_object_comes_back_as_evicted(objects: Make) -> None:
    tier = sized_tier(objects, 2, high_watermark=1.0, low_watermark=1.0)
    for seed in range(2):
        tier.put(objects(seed))
        for _ in range(3):
            tier.get(objects(seed).meta.key)
    newcomer = objects("cold")
    assert tier.put(newcomer) == [newcomer]
    assert tier.get_meta(newcomer.meta.key) is None
    assert tier.stats().num_rejected == 1
    assert tier.stats().num_objects == 2


def test_free_room_always_admits(objects: Make) -> None:
    tier = sized_tier(objects, 4, high_watermark=1.0, low_watermark=1.0)
    tier.put(objects(0))
    for _ in range(10):
        tier.get(objects(0).meta.key)
    assert tier.put(objects("cold")) == []
    assert tier.get(objects("cold").meta.key) is not None


def test_pinned_objects_are_never_evicted(objects: Make) -> None:
    tier = sized_tier(objects, 4, high_watermark=1.0, low_watermark=0.5, admission=False)
    tier.put(objects("pinned"))
    assert tier.pin(objects("pinned").meta.key)
    assert tier.is_pinned(objects("pinned").meta.key)
    for seed in range(50):
        tier.put(objects(seed))
    assert tier.get(objects("pinned").meta.key) is not None
    assert tier.stats().num_pinned == 1
    assert tier.unpin(objects("pinned").meta.key)
    assert not tier.unpin(objects("pinned").meta.key)
    for seed in range(50, 60):
        tier.put(objects(seed))
    assert tier.get_meta(objects("pinned").meta.key) is None


def test_capacity_error_when_only_pinned_objects_could_make_room(objects: Make) -> None:
    tier = sized_tier(objects, 3, high_watermark=1.0, low_watermark=1.0)
    for seed in range(3):
        tier.put(objects(seed))
        tier.pin(objects(seed).meta.key)
    before = tier.stats()
    with pytest.raises(CapacityError):
        tier.put(objects("one more"))
    with pytest.raises(CapacityError):
        tier.put(objects("huge", layer_nbytes=100_000))
    assert tier.stats() == before
    assert tier.delete(objects(0).meta.key)  # delete removes pinned objects too
    assert tier.put(objects("one more")) == []
    tier.check_integrity()


def test_replacing_a_key_keeps_its_pin_and_accounting(objects: Make) -> None:
    tier = MemoryTier(1 << 20)
    tier.put(objects("a"))
    tier.pin(objects("a").meta.key)
    bigger = objects("a", layer_nbytes=1000)
    tier.put(bigger)
    assert tier.get(bigger.meta.key) is bigger
    assert tier.is_pinned(bigger.meta.key)
    assert tier.stats().stored_bytes == held_nbytes(bigger)
    tier.check_integrity()


def test_reads(objects: Make) -> None:
    tier = MemoryTier(1 << 20)
    obj = objects("a", num_layers=3)
    tier.put(obj)
    assert tier.get_layer(obj.meta.key, 2) == obj.layers[2]
    with pytest.raises(InvalidObjectError):
        tier.get_layer(obj.meta.key, 3)
    assert tier.get_layer(objects("b").meta.key, 0) is None
    assert tier.get(objects("b").meta.key) is None
    assert list(tier.keys()) == [obj.meta.key]
    assert not tier.pin(objects("b").meta.key)
    assert not tier.delete(objects("b").meta.key)


def test_accounting_matches_the_ram_actually_held(objects: Make) -> None:
    """Accounted bytes track tracemalloc's view of what the tier keeps alive (±15%)."""
    for num_layers, layer_nbytes, num_objects in [(2, 16, 2000), (4, 256, 1000), (30, 2000, 100)]:
        tier = MemoryTier(1 << 40)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for seed in range(num_objects):
                tier.put(objects(seed, num_layers=num_layers, layer_nbytes=layer_nbytes))
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        accounted = tier.stats().stored_bytes
        assert 0.85 * accounted <= held <= 1.15 * accounted, (num_layers, held, accounted)


def test_threads_keep_the_accounting_consistent(objects: Make) -> None:
    tier = sized_tier(objects, 20, high_watermark=0.9, low_watermark=0.7)
    pool = [objects(seed, layer_nbytes=64 + seed) for seed in range(100)]

    wrong: list[object] = []

    def work(offset: int) -> None:
        for step in range(300):
            obj = pool[(offset * 37 + step * 11) % len(pool)]
            tier.put(obj)
            got = tier.get(pool[(offset + step) % len(pool)].meta.key)
            if got is not None and got not in pool:
                wrong.append(got)
            if step % 50 == 0:
                tier.pin(obj.meta.key)
                tier.unpin(obj.meta.key)
                tier.delete(pool[step % len(pool)].meta.key)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    tier.check_integrity()


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigError):
        MemoryTier(0)
    with pytest.raises(ConfigError):
        MemoryTier(100, high_watermark=0.5, low_watermark=0.8)


def test_leased_objects_are_passed_over_until_the_lease_ends(objects: Make) -> None:
    import time

    tier = sized_tier(objects, 3, high_watermark=1.0, low_watermark=1.0, admission=False)
    for seed in range(3):
        tier.put(objects(seed))
    keys = [objects(seed).meta.key for seed in range(3)]
    assert tier.protect([keys[0], keys[1], "absent"], time.monotonic() + 60) == 2
    assert [o.meta.key for o in tier.put(objects(3))] == [keys[2]]  # 0, 1 leased: 2 goes
    assert tier.protect([keys[0], keys[1], objects(3).meta.key], time.monotonic() + 60) == 3
    assert tier.put(objects(4)) == [objects(4)]  # everything leased: declined, a tier down
    tier.protect([keys[0]], time.monotonic() - 1)  # lapsed: plain LRU again
    assert [o.meta.key for o in tier.put(objects(5))] == [keys[0]]
    tier.check_integrity()
