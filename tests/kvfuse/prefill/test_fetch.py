"""LayerFetch and StreamedChunk: blocking reads, failures, deadlines, cancel, validation."""

from __future__ import annotations

import threading

import pytest
import torch
from prefill_helpers import TestSource, poll

from kvfuse.chunk_store import ChunkStore
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import ChunkKV
from kvfuse.prefill.fetch import LayerFetch, Layout
from prefill_worker.metrics import PrefillMetrics

LAYOUT = Layout(num_layers=4, num_kv_heads=2, head_dim=8)
KEYS = ("a" * 64, "b" * 64)


def make_store() -> ChunkStore:
    store = ChunkStore(1 << 20)
    for idx, key in enumerate(KEYS):
        shape = (LAYOUT.num_layers, 3 + idx, LAYOUT.num_kv_heads, LAYOUT.head_dim)
        positions = torch.arange(5, 5 + shape[1])
        store.put(key, ChunkKV(torch.randn(shape), torch.randn(shape), positions))
    return store


def start(source: TestSource, deadline_s: float = 60.0) -> tuple[LayerFetch, PrefillMetrics]:
    metrics = PrefillMetrics()
    infos = source.lookup(KEYS)
    return LayerFetch(source, infos, LAYOUT, deadline_s, metrics).start(), metrics


def test_layers_arrive_whole_and_in_order() -> None:
    store = make_store()
    fetch, metrics = start(TestSource(store))
    for key in KEYS:
        kv, chunk = store.get(key), fetch.chunks[key]
        assert kv is not None and torch.equal(chunk.positions, kv.positions)
        for idx in range(LAYOUT.num_layers):
            k, v = chunk.layer(idx)
            assert torch.equal(k, kv.k[idx]) and torch.equal(v, kv.v[idx])
        materialized = fetch.materialize(key)
        assert materialized is not None and torch.equal(materialized.k, kv.k)
    poll(lambda: fetch.complete_keys() == set(KEYS))
    fetch.close()
    assert not fetch.failed
    assert metrics.registry.get_sample_value("kvfuse_prefill_layer_load_seconds_count") == 4
    assert metrics.registry.get_sample_value("kvfuse_prefill_fetched_bytes_total") == sum(
        kv.k.numel() * 4 * 2 for kv in map(store.get, KEYS) if kv is not None
    )


def test_a_read_blocks_until_its_layer_arrives() -> None:
    source = TestSource(make_store(), hold_at=2)
    fetch, _ = start(source)
    chunk = fetch.chunks[KEYS[0]]
    got = threading.Event()

    def read() -> None:
        chunk.layer(2)
        got.set()

    threading.Thread(target=read, daemon=True).start()
    chunk.layer(1)  # earlier layers are readable while layer 2 is held
    assert source.held.wait(30)
    assert not got.is_set()  # layer 2 cannot have arrived: the source holds it
    source.release.set()
    assert got.wait(30)


def test_a_failure_wakes_readers_and_keeps_what_arrived() -> None:
    source = TestSource(make_store(), fail_at=2)
    fetch, _ = start(source)
    chunk = fetch.chunks[KEYS[1]]
    chunk.layer(1)
    with pytest.raises(ServiceUnavailableError, match="injected"):
        chunk.layer(2)
    assert fetch.failed and fetch.reason == "cache_unavailable"
    assert fetch.complete_keys() == set() and fetch.materialize(KEYS[1]) is None
    chunk.layer(0)  # still readable


def test_a_stream_that_ends_early_is_a_cache_error() -> None:
    store = make_store()
    source = TestSource(store)
    infos = source.lookup(KEYS)
    store.delete(KEYS[1])  # evicted between lookup and stream
    fetch = LayerFetch(source, infos, LAYOUT, 60.0, PrefillMetrics()).start()
    fetch.chunks[KEYS[0]].layer(3)
    with pytest.raises(ServiceUnavailableError, match="ended"):
        fetch.chunks[KEYS[1]].layer(0)
    assert fetch.reason == "cache_error" and fetch.complete_keys() == {KEYS[0]}


def test_the_deadline_fails_a_held_stream() -> None:
    source = TestSource(make_store(), hold_at=1)
    fetch, _ = start(source, deadline_s=0.1)
    try:
        with pytest.raises(ServiceUnavailableError, match="DEADLINE_EXCEEDED"):
            fetch.chunks[KEYS[0]].layer(1)
        assert fetch.reason == "cache_timeout"
    finally:
        source.release.set()
    poll(source.closed.is_set, what="the stream to be dropped")


def test_cancel_wakes_readers_and_drops_the_stream() -> None:
    source = TestSource(make_store(), hold_at=1)
    fetch, _ = start(source)
    assert source.held.wait(30)
    fetch.cancel()
    with pytest.raises(ServiceUnavailableError, match="cancelled"):
        fetch.chunks[KEYS[0]].layer(1)
    assert fetch.reason == "cancelled"
    source.release.set()
    poll(source.closed.is_set, what="the stream to be dropped")
    assert source.sent_layers == [0, 0, 1]  # the held layer went out, nothing after it


def test_a_malformed_layer_fails_the_fetch() -> None:
    fetch, _ = start(TestSource(make_store(), bad_at=1))
    with pytest.raises(ServiceUnavailableError, match="expected"):
        fetch.chunks[KEYS[0]].layer(1)
    assert fetch.reason == "cache_error"
