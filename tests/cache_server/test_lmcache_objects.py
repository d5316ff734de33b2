"""LMCache objects as stored objects: key space, record layout, round trip."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cache_server.lmcache_objects import (
    RECORD_HEAD,
    from_stored,
    pack_head,
    storage_key,
    to_stored,
)
from cache_server.objects import LMCACHE_CODEC, LMCACHE_NAMESPACE, StoredObject, check_key
from cache_server.wire import storage_key as tenant_key
from kvfuse.errors import InvalidObjectError
from kvfuse.service.auth import TENANT_PATTERN
from kvfuse.transport import lmcache_wire as wire
from kvfuse.transport.crc import crc32

INFO = wire.ObjectInfo(wire.MemoryFormat.KV_2LTD, 3, (2, 2, 4, 8), 256)  # bf16


def test_round_trip_keeps_bytes_and_metadata() -> None:
    payload = bytes(range(256))
    obj = to_stored(b"m@1@0@ab@bfloat16", INFO, payload)
    assert obj.meta.codec == LMCACHE_CODEC and obj.meta.num_layers == 2
    assert obj.meta.layer_crc32 == (crc32(pack_head(INFO)), crc32(payload))
    obj.verify()
    info, stored = from_stored(obj)
    assert info == INFO and stored is payload  # kept as received: no copy
    assert obj.meta.layer_nbytes == (RECORD_HEAD.size, 256)


def test_objects_of_the_one_record_layout_still_read_back() -> None:
    record = pack_head(INFO) + bytes(range(256))
    two = to_stored(b"k", INFO, bytes(range(256)))
    meta = replace(two.meta, num_layers=1, layer_nbytes=(len(record),),
                   layer_crc32=(crc32(record),))  # fmt: skip
    info, payload = from_stored(StoredObject(meta, (record,)))
    assert info == INFO and bytes(payload) == bytes(range(256))


def test_keys_live_where_no_tenant_can_reach() -> None:
    key = storage_key(b"m@1@0@ab@bfloat16")
    assert key.startswith("_lmcache/") and check_key(key) == key
    digest = key.split("/")[1]
    assert tenant_key("default", digest) != key  # same digest, another key space
    assert not TENANT_PATTERN.match(LMCACHE_NAMESPACE)  # no token can map to such a tenant


def test_other_objects_are_not_lmcache_objects() -> None:
    obj = to_stored(b"k", INFO, bytes(256))
    with pytest.raises(InvalidObjectError, match="not an LMCache object"):
        from_stored(StoredObject(replace(obj.meta, codec="raw"), obj.layers))
    bad = (b"XXXX" + obj.layers[0][4:], obj.layers[1])
    meta = replace(obj.meta, layer_crc32=tuple(crc32(r) for r in bad))
    with pytest.raises(InvalidObjectError, match="magic"):
        from_stored(StoredObject(meta, bad))
