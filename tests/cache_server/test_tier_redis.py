"""RedisTier against a real redis-server: layout, budget, LRU, pins, TTL, corruption, outages."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from cache_server.objects import StoredObject
from cache_server.tiers.redis_tier import RedisTier
from kvfuse.errors import CapacityError, ConfigError, InvalidObjectError, TierUnavailableError

Make = Callable[..., StoredObject]


def nbytes(obj: StoredObject) -> int:
    return obj.meta.total_nbytes + len(obj.meta.to_bytes())


def make_tier(redis_server: Any, capacity_bytes: int = 1 << 24, **kwargs: Any) -> RedisTier:
    return RedisTier(redis_server.url, capacity_bytes, retry_interval_s=0.0, **kwargs)


def test_round_trip_and_key_layout(redis_server: Any, objects: Make) -> None:
    tier = make_tier(redis_server, prefix="kvf-test:")
    obj = objects("a", num_layers=3, tenant="acme")
    assert tier.put(obj) == []
    assert tier.get_meta(obj.meta.key) == obj.meta
    assert tier.get(obj.meta.key) == obj
    assert [tier.get_layer(obj.meta.key, i) for i in range(3)] == list(obj.layers)
    with pytest.raises(InvalidObjectError):
        tier.get_layer(obj.meta.key, 3)
    assert tier.get(objects("b").meta.key) is None
    assert tier.get_layer(objects("b").meta.key, 0) is None
    assert list(tier.keys()) == [obj.meta.key]
    raw = {k.decode() for k in redis_server.client().keys("*")}
    # One hash tag per object, one for the index: cluster-ready.
    assert raw == {f"kvf-test:{{{obj.meta.key}}}"} | {
        f"kvf-test:{{_index}}:{name}" for name in ("sizes", "lru", "bytes")
    }
    assert tier.stats().stored_bytes == nbytes(obj)
    assert tier.delete(obj.meta.key) and not tier.delete(obj.meta.key)
    assert tier.stats().stored_bytes == 0 and tier.stats().num_objects == 0
    tier.close()


def test_prefixes_separate_caches_sharing_a_redis(redis_server: Any, objects: Make) -> None:
    one, two = make_tier(redis_server, prefix="one:"), make_tier(redis_server, prefix="two:")
    one.put(objects("a"))
    assert two.get(objects("a").meta.key) is None
    assert two.stats().num_objects == 0 and one.stats().num_objects == 1
    with pytest.raises(ConfigError):
        make_tier(redis_server, prefix="bad{tag}:")


def test_budget_never_exceeded_and_lru_eviction(redis_server: Any, objects: Make) -> None:
    unit = nbytes(objects(0))
    tier = make_tier(redis_server, int(unit * 4.5))
    for seed in range(4):
        assert tier.put(objects(seed)) == []
    assert tier.get(objects(0).meta.key) is not None
    assert tier.get_layer(objects(1).meta.key, 0) is not None
    assert tier.put(objects(4)) == [objects(2)]  # evicted objects come back whole
    for seed in range(5, 60):
        tier.put(objects(seed, layer_nbytes=200 + seed))
        assert tier.stats().stored_bytes <= tier.capacity_bytes
    assert tier.stats().num_evictions > 40
    stored = int(redis_server.client().get("kvfuse:{_index}:bytes"))
    held = [tier.get(k) for k in list(tier.keys())]
    assert stored == sum(nbytes(obj) for obj in held if obj is not None)
    tier.close()


def test_pins_and_capacity_error(redis_server: Any, objects: Make) -> None:
    unit = nbytes(objects(0))
    tier = make_tier(redis_server, int(unit * 2.5), return_evicted=False)
    for seed in range(2):
        tier.put(objects(seed))
        assert tier.pin(objects(seed).meta.key)
    assert not tier.pin(objects("absent").meta.key)
    with pytest.raises(CapacityError):
        tier.put(objects(2))
    with pytest.raises(CapacityError):
        tier.put(objects("huge", layer_nbytes=10 * unit))
    assert tier.get(objects(2).meta.key) is None
    assert tier.unpin(objects(0).meta.key) and not tier.unpin(objects(0).meta.key)
    assert tier.put(objects(2)) == []  # return_evicted=False: evicted, not returned
    assert tier.get_meta(objects(0).meta.key) is None
    assert tier.is_pinned(objects(1).meta.key) and tier.stats().num_pinned == 1
    tier.close()


def test_ttl_spares_pinned_objects_and_expired_ones_leave_the_index(
    redis_server: Any, objects: Make
) -> None:
    tier = make_tier(redis_server, ttl_s=3600)
    client = redis_server.client()
    obj = objects("a")
    tier.put(obj)
    okey = f"kvfuse:{{{obj.meta.key}}}"
    assert 0 < client.pttl(okey) <= 3600_000
    tier.pin(obj.meta.key)
    assert client.pttl(okey) == -1  # no expiry while pinned
    tier.unpin(obj.meta.key)
    assert client.pttl(okey) > 0
    tier.put(objects("b"))
    client.delete(f"kvfuse:{{{objects('b').meta.key}}}")  # what expiry does
    assert tier.stats().num_objects == 1
    assert tier.stats().stored_bytes == nbytes(obj)
    tier.close()


def test_flipped_byte_is_detected_and_removed(redis_server: Any, objects: Make) -> None:
    tier = make_tier(redis_server)
    obj = objects("a", num_layers=3)
    tier.put(obj)
    tier.put(objects("b"))
    okey = f"kvfuse:{{{obj.meta.key}}}"
    record = bytearray(obj.layers[1])
    record[5] ^= 1
    redis_server.client().hset(okey, b"1", bytes(record))
    assert tier.get_layer(obj.meta.key, 0) == obj.layers[0]
    assert tier.get_layer(obj.meta.key, 1) is None
    stats = tier.stats()
    assert stats.num_corrupt == 1 and stats.num_objects == 1
    assert tier.get(obj.meta.key) is None
    redis_server.client().hset(f"kvfuse:{{{objects('b').meta.key}}}", b"meta", b"{not json")
    assert tier.get_meta(objects("b").meta.key) is None
    assert tier.stats().num_corrupt == 2 and tier.stats().stored_bytes == 0
    tier.close()


def test_readers_never_see_a_mix_of_two_writes(redis_server: Any, objects: Make) -> None:
    tier = make_tier(redis_server)
    key = objects("same").meta.key
    versions = [
        StoredObject(replace(v.meta, key=key), v.layers)
        for v in (objects(i, num_layers=6, layer_nbytes=20_000 + i) for i in range(4))
    ]
    done = threading.Event()

    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(10):
                for version in versions:
                    tier.put(version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    writer = threading.Thread(target=write)
    writer.start()
    seen = 0
    while not done.is_set():
        obj = tier.get(key)
        assert obj is None or obj in versions
        seen += obj is not None
    writer.join()
    assert errors == [] and seen > 0
    assert tier.stats().num_corrupt == 0 and tier.stats().num_objects == 1
    assert tier.get(key) == versions[-1]
    tier.close()


def test_down_redis_raises_unavailable_and_recovers(
    redis_server: Any, objects: Make, poll: Callable[..., bool]
) -> None:
    tier = make_tier(redis_server)
    tier.put(objects("a"))
    assert tier.stats().up
    redis_server.stop()
    for call in (
        lambda: tier.get(objects("a").meta.key),
        lambda: tier.get_meta(objects("a").meta.key),
        lambda: tier.get_layer(objects("a").meta.key, 0),
        lambda: tier.put(objects("b")),
        lambda: tier.delete(objects("a").meta.key),
        lambda: tier.pin(objects("a").meta.key),
        lambda: list(tier.keys()),
    ):
        with pytest.raises(TierUnavailableError):
            call()
    stats = tier.stats()  # never raises
    assert not stats.up and stats.num_objects == 1  # the last known numbers
    redis_server.start()  # back, empty (no persistence)

    def works() -> bool:
        try:
            return tier.put(objects("b")) == []
        except TierUnavailableError:
            return False

    assert poll(works)
    assert tier.stats().up
    assert tier.get(objects("b").meta.key) == objects("b")
    tier.close()


def test_fails_fast_while_down_within_the_retry_interval(redis_server: Any, objects: Make) -> None:
    tier = RedisTier(redis_server.url, 1 << 20, retry_interval_s=3600)
    redis_server.stop()
    with pytest.raises(TierUnavailableError):
        tier.get(objects("a").meta.key)
    redis_server.start()
    with pytest.raises(TierUnavailableError, match="down"):  # no network call until the interval
        tier.get(objects("a").meta.key)
    tier.close()
