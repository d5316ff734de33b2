"""Chunk sources: the in-process store as a source, rendezvous sharding over cache servers."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.chunk_store import ChunkStore
from kvfuse.errors import CapacityError
from kvfuse.kv import ChunkKV
from kvfuse.prefill.sources import (
    CacheServerSource,
    Shards,
    StoreSource,
    positions_of,
    shard_name,
)

KEYS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(400)]


def test_local_source_streams_by_layer_and_puts_once() -> None:
    store = ChunkStore(1 << 20)
    source = StoreSource(store)
    kv = ChunkKV(torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8), torch.arange(7, 11))
    assert source.put(KEYS[0], kv) and not source.put(KEYS[0], kv)
    source.put(KEYS[1], ChunkKV(kv.k[:, :2], kv.v[:, :2], torch.arange(2)))
    found = source.lookup([KEYS[0], KEYS[2]])
    assert list(found) == [KEYS[0]]
    info = found[KEYS[0]]
    assert (info.num_tokens, info.num_layers, info.position_offset) == (4, 3, 7)
    items = list(source.get_layers([KEYS[0], KEYS[2], KEYS[1]]))
    assert [(i.key, i.layer_idx) for i in items] == [
        (key, layer) for layer in range(3) for key in (KEYS[0], KEYS[1])
    ]
    assert torch.equal(items[2].k, kv.k[1])
    assert torch.equal(positions_of(info), torch.arange(7, 11))


def test_rendezvous_spreads_keys_and_moves_only_a_removed_servers_keys() -> None:
    names = ["a:1", "b:2", "c:3"]
    three = Shards([StoreSource(ChunkStore(1))] * 3, names)
    two = Shards([StoreSource(ChunkStore(1))] * 2, names[:2])
    owners = [three.owner(k) for k in KEYS]
    assert all(owners.count(i) > len(KEYS) // 6 for i in range(3))  # roughly even
    for key, owner in zip(KEYS, owners, strict=True):
        if owner < 2:
            assert two.owner(key) == owner  # keys of the remaining servers stay put
    groups = three.split(KEYS[:10])
    assert sorted(k for ks in groups.values() for k in ks) == sorted(KEYS[:10])


def test_cache_server_source_put_says_stored_now_already_stored_or_raises() -> None:
    settings = {"port": 0, "metrics_port": None, "memory_bytes": "1MiB", "grace_s": 0}
    with CacheServer(CacheServerConfig.from_mapping(settings)) as server:
        source = CacheServerSource(server.address, None, 10, 10, 10)
        try:
            objects = [
                ChunkKV(torch.randn(2, 100, 2, 64), torch.randn(2, 100, 2, 64), torch.arange(100))
                for _ in range(5)
            ]  # 200 KiB each: the memory tier holds four
            for key, kv in zip(KEYS[:4], objects, strict=False):
                assert source.put(key, kv) is True
                for _ in range(3):  # read often: the admission keeps them
                    assert len(list(source.get_layers([key]))) == 2
            assert source.put(KEYS[0], objects[0]) is False
            with pytest.raises(CapacityError, match=r"did not store it \(admission\)"):
                source.put(KEYS[4], objects[4])
            assert source.lookup([KEYS[4]]) == {}
        finally:
            source.close()


@pytest.mark.parametrize(
    ("address", "name"),
    [
        (
            "kv-kvfuse-cache-0.kv-kvfuse-cache-headless.ns.svc.cluster.local:50051",
            "kv-kvfuse-cache-0",
        ),
        ("10.1.0.4:50051", "10.1.0.4:50051"),
        ("127.0.0.1:7001", "127.0.0.1:7001"),
        ("localhost:50051", "localhost:50051"),
        ("[fd00::4]:50051", "[fd00::4]:50051"),
    ],
)
def test_shard_name_is_the_pod_name_for_a_pod_dns_name(address: str, name: str) -> None:
    assert shard_name(address) == name
