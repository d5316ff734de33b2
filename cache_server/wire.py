"""Translation between protobuf messages and the server's objects (to_proto / from_proto)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from cache_server.objects import ObjectMeta
from cache_server.store import Location
from cache_server.tiers.base import TierStats
from kvfuse.errors import InvalidObjectError
from kvfuse.v1 import cache_pb2, common_pb2

CHUNK_KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def check_chunk_key(key: str) -> str:
    """`key` if it is a client chunk key (64 lowercase hex chars), else InvalidObjectError."""
    if not CHUNK_KEY_PATTERN.match(key):
        raise InvalidObjectError(f"malformed key {key[:80]!r}: expected 64 lowercase hex chars")
    return key


def check_keys(keys: Sequence[str], max_keys: int) -> list[str]:
    """The chunk keys of a batch request, validated, in request order."""
    if len(keys) > max_keys:
        raise InvalidObjectError(f"{len(keys)} keys in one request; the limit is {max_keys}")
    return [check_chunk_key(k) for k in keys]


def storage_key(tenant: str, key: str) -> str:
    """Where the server stores a tenant's chunk: "<tenant>/<chunk key>"."""
    return f"{tenant}/{check_chunk_key(key)}"


def chunk_key_of(stored_key: str) -> str:
    """The client's chunk key of a storage key (the tenant prefix removed)."""
    return stored_key.rsplit("/", 1)[-1]


def meta_from_proto(pb: common_pb2.ObjectMeta, tenant: str) -> ObjectMeta:
    """The metadata of a Put header, keyed for `tenant`; InvalidObjectError if inconsistent."""
    return ObjectMeta(
        key=storage_key(tenant, pb.key),
        num_layers=pb.num_layers,
        num_tokens=pb.num_tokens,
        num_kv_heads=pb.num_kv_heads,
        head_dim=pb.head_dim,
        dtype=pb.dtype,
        codec=pb.codec,
        position_offset=pb.position_offset,
        layer_nbytes=tuple(pb.layer_nbytes),
        layer_crc32=tuple(pb.layer_crc32),
    )


def meta_to_proto(meta: ObjectMeta) -> common_pb2.ObjectMeta:
    return common_pb2.ObjectMeta(
        key=chunk_key_of(meta.key),
        num_layers=meta.num_layers,
        num_tokens=meta.num_tokens,
        num_kv_heads=meta.num_kv_heads,
        head_dim=meta.head_dim,
        dtype=meta.dtype,
        codec=meta.codec,
        position_offset=meta.position_offset,
        layer_nbytes=meta.layer_nbytes,
        layer_crc32=meta.layer_crc32,
    )


def entry_to_proto(key: str, location: Location | None) -> cache_pb2.Entry:
    """A Lookup/List entry: found with tier, size and metadata, or just the key on a miss."""
    if location is None:
        return cache_pb2.Entry(key=key, found=False)
    return cache_pb2.Entry(
        key=key,
        found=True,
        tier=location.tier,
        nbytes=location.meta.total_nbytes,
        pinned=location.pinned,
        meta=meta_to_proto(location.meta),
    )


def tier_stats_to_proto(stats: TierStats, codec: str) -> cache_pb2.TierStats:
    return cache_pb2.TierStats(
        name=stats.name,
        up=stats.up,
        codec=codec,
        capacity_bytes=stats.capacity_bytes,
        stored_bytes=stats.stored_bytes,
        num_objects=stats.num_objects,
        num_pinned=stats.num_pinned,
        num_evictions=stats.num_evictions,
        num_corrupt=stats.num_corrupt,
        num_rejected=stats.num_rejected,
    )
