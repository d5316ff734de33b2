"""Translation between protobuf messages and the server's objects (to_proto / from_proto)."""

from __future__ import annotations

from collections.abc import Sequence

from cache_server.objects import ObjectMeta
from cache_server.store import Location, Placement
from cache_server.tiers.base import TierStats
from kvfuse.errors import InvalidObjectError
from kvfuse.transport.messages import from_message, to_message
from kvfuse.transport.protocol import check_chunk_key
from kvfuse.v1 import cache_pb2, common_pb2


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
    return from_message(pb, ObjectMeta, key=storage_key(tenant, pb.key))


def meta_to_proto(meta: ObjectMeta) -> common_pb2.ObjectMeta:
    return to_message(meta, common_pb2.ObjectMeta, key=chunk_key_of(meta.key))


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


def tier_stats_to_proto(stats: TierStats, codec: str, hidden: bool) -> cache_pb2.TierStats:
    """A tier's Stats entry; with `hidden`, only its name, state, codec and capacity (its
    counters describe every tenant's objects: for the admin tenant only)."""
    if hidden:
        return cache_pb2.TierStats(
            name=stats.name,
            up=stats.up,
            codec=codec,
            capacity_bytes=stats.capacity_bytes,
            counters_hidden=True,
        )
    return to_message(stats, cache_pb2.TierStats, codec=codec)


def put_response(key: str, created: bool, placement: Placement) -> cache_pb2.PutResponse:
    """What a Put answers: whether it stored the object, where it is, or why no tier kept it."""
    return cache_pb2.PutResponse(
        key=key,
        created=created,
        stored=placement.stored,
        tier=placement.tier or "",
        nbytes=placement.nbytes,
        reason=placement.reason,
    )


def object_heat(storage_key: str, location: Location, heat: float) -> cache_pb2.ObjectHeat:
    """One object as the Heat RPC reports it (storage key: any tenant's; admin only)."""
    meta = location.meta
    return cache_pb2.ObjectHeat(
        storage_key=storage_key,
        tier=location.tier,
        codec=meta.codec,
        nbytes=meta.total_nbytes,
        pinned=location.pinned,
        heat=heat,
    )
