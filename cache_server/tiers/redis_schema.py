"""How the Redis tier lays objects out: a hash per object, index scripts, parsing and checks.

Bookkeeping lives in one hash slot (`{_index}`); each object in its own slot (`{<key>}`). No
command or script touches both, so the layout works on Redis Cluster too.
"""

from __future__ import annotations

from cache_server.objects import ObjectMeta, StoredObject
from kvfuse.errors import CorruptRecordError, InvalidObjectError
from kvfuse.transport.crc import check_record

META_FIELD = b"meta"

# KEYS: sizes hash, lru zset, bytes counter; ARGV: key, nbytes, access time.
REMEMBER = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return redis.call('INCRBY', KEYS[3], tonumber(ARGV[2]) - old)
"""

# KEYS: sizes hash, lru zset, bytes counter, pins set; ARGV: key. Returns 1 if it was tracked.
FORGET = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
if old then redis.call('DECRBY', KEYS[3], tonumber(old)) end
return old and 1 or 0
"""


def to_fields(obj: StoredObject, meta_bytes: bytes) -> dict[bytes, bytes]:
    """The hash of one object: b"meta" → metadata JSON, b"<i>" → layer i's record."""
    fields = {META_FIELD: meta_bytes}
    fields.update({str(idx).encode(): record for idx, record in enumerate(obj.layers)})
    return fields


def parse_meta(key: str, data: bytes) -> ObjectMeta:
    """Stored metadata of `key`; CorruptRecordError if malformed or naming another key."""
    try:
        meta = ObjectMeta.from_bytes(data)
    except InvalidObjectError as exc:
        raise CorruptRecordError(f"{key}: {exc}") from exc
    if meta.key != key:
        raise CorruptRecordError(f"{key}: stored metadata names {meta.key}")
    return meta


def verify_record(meta: ObjectMeta, layer_idx: int, record: bytes | None) -> bytes:
    """`record` if it is layer `layer_idx` of `meta` intact; else CorruptRecordError."""
    if record is None or len(record) != meta.layer_nbytes[layer_idx]:
        raise CorruptRecordError(f"{meta.key}: layer {layer_idx} is missing or short")
    check_record(meta.key, layer_idx, record, meta.layer_crc32[layer_idx])
    return record


def parse_object(key: str, fields: dict[bytes, bytes]) -> StoredObject:
    """The object stored in a hash; CorruptRecordError if anything is missing or wrong."""
    meta = parse_meta(key, fields.get(META_FIELD, b""))
    layers = [fields.get(str(idx).encode()) for idx in range(meta.num_layers)]
    return StoredObject(meta, tuple(verify_record(meta, i, r) for i, r in enumerate(layers)))
