"""The in-process chunk store: byte-bounded LRU eviction, hit/miss/eviction counts, deletes."""

from __future__ import annotations

import pytest
import torch

from kvfuse.chunk_store import ChunkStore
from kvfuse.kv import ChunkKV

BYTES_PER_TOKEN = 40  # K + V: 2 × (1 layer × 1 head × 4 dims × 4 bytes) + an int64 position


def chunk(num_tokens: int, fill: float = 0.0) -> ChunkKV:
    """A ChunkKV of exactly `num_tokens * BYTES_PER_TOKEN` bytes."""
    kv = torch.full((1, num_tokens, 1, 4), fill)  # [L, T, H_kv, D] fp32
    return ChunkKV(kv, kv.clone(), torch.arange(num_tokens))


def keys_in_store(store: ChunkStore, candidates: str) -> str:
    return "".join(k for k in candidates if store.contains(k))


def test_chunk_size_helper() -> None:
    assert chunk(3).num_bytes == 3 * BYTES_PER_TOKEN


def test_get_returns_what_was_put() -> None:
    store = ChunkStore(1000)
    obj = chunk(2, fill=1.5)
    assert store.put("a", obj)
    assert store.get("a") is obj
    assert store.get("b") is None


def test_evicts_least_recently_put_first() -> None:
    store = ChunkStore(3 * 80)
    for key in "abc":
        assert store.put(key, chunk(2))  # 80 bytes each: full
    assert store.put("d", chunk(2))
    assert keys_in_store(store, "abcd") == "bcd"


def test_get_moves_to_most_recent() -> None:
    store = ChunkStore(3 * 80)
    for key in "abc":
        store.put(key, chunk(2))
    assert store.get("a") is not None
    store.put("d", chunk(2))
    assert keys_in_store(store, "abcd") == "acd"


def test_evicts_as_many_as_the_new_bytes_need() -> None:
    store = ChunkStore(4 * 80)
    for key in "abcd":
        store.put(key, chunk(2))
    store.put("big", chunk(6))  # 240 bytes: a, b and c must go
    assert keys_in_store(store, "abcd") == "d"
    assert store.contains("big")
    stats = store.stats()
    assert stats.stored_bytes == 320
    assert stats.num_evictions == 3


def test_object_larger_than_capacity_is_refused() -> None:
    store = ChunkStore(200)
    store.put("a", chunk(2))
    assert not store.put("huge", chunk(6))  # 240 > 200
    assert not store.contains("huge")
    assert store.contains("a")  # nothing evicted for a put that cannot succeed
    assert store.stats().num_evictions == 0


def test_object_of_exactly_capacity_fits() -> None:
    store = ChunkStore(240)
    assert store.put("a", chunk(6))
    assert store.stats().stored_bytes == 240


def test_replacing_a_key_does_not_double_count() -> None:
    store = ChunkStore(1000)
    store.put("a", chunk(2))
    store.put("a", chunk(5))
    stats = store.stats()
    assert (stats.num_objects, stats.stored_bytes, stats.num_evictions) == (1, 200, 0)
    obj = store.get("a")
    assert obj is not None
    assert obj.num_tokens == 5


def test_stats_count_hits_misses_evictions() -> None:
    store = ChunkStore(2 * 80)
    store.put("a", chunk(2))
    store.put("b", chunk(2))
    store.get("a")
    store.get("a")
    store.get("zzz")
    store.put("c", chunk(2))  # evicts b (a was used more recently)
    store.get("b")
    assert store.contains("a")  # contains is not a lookup: no hit or miss counted
    stats = store.stats()
    assert (stats.num_hits, stats.num_misses, stats.num_evictions) == (2, 2, 1)
    assert (stats.num_objects, stats.stored_bytes, stats.capacity_bytes) == (2, 160, 160)


def test_delete() -> None:
    store = ChunkStore(1000)
    store.put("a", chunk(2))
    store.put("b", chunk(3))
    assert store.delete("a")
    assert not store.delete("a")
    assert store.get("a") is None
    stats = store.stats()
    assert (stats.num_objects, stats.stored_bytes) == (1, 120)


def test_clear_empties_the_store() -> None:
    store = ChunkStore(1000)
    store.put("a", chunk(2))
    store.clear()
    assert store.stats().num_objects == 0
    assert store.stats().stored_bytes == 0
    assert store.put("b", chunk(25))  # the full capacity is available again


@pytest.mark.parametrize("dtype, element_bytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_num_bytes_counts_k_v_and_positions(dtype: torch.dtype, element_bytes: int) -> None:
    kv = torch.zeros(3, 5, 2, 8, dtype=dtype)  # [L, T, H_kv, D]
    obj = ChunkKV(kv, kv.clone(), torch.arange(5))
    assert obj.num_bytes == 2 * 3 * 5 * 2 * 8 * element_bytes + 5 * 8
