"""LMCache objects as stored objects: their keys, and two records: LMCache's header, its payload.

An LMCache PUT carries a key string, a memory format, a dtype, a 4-d shape and `length` payload
bytes. It is stored as a `StoredObject` with two layer records:

    record 0 = "LMC1" | fmt | dtype | shape[4] | 0   (32 bytes, little-endian int32s)
    record 1 = the payload, exactly as received (the bytes object the socket filled)

under the storage key `_lmcache/<SHA-256 of the key string>` (`LMCACHE_NAMESPACE`, which no
tenant can name). Its metadata has codec `lmcache` (every tier stores the records as they are:
nothing is transcoded, so a GET returns the same bytes from memory, disk or Redis) and the
records' sizes and CRC-32s, which the disk and Redis tiers check on every read (the disk tier
over the mapped file, which a GET then sends from). The K/V fields of `ObjectMeta` do not
apply to such an object and are fixed placeholders (1 token, 1 head, head_dim 1, float16);
record 0 is the only source of LMCache's metadata. Objects stored by earlier versions as one
record (header and payload back to back) still read back.
"""

from __future__ import annotations

import hashlib
import struct

from cache_server.objects import LMCACHE_CODEC, LMCACHE_NAMESPACE, ObjectMeta, StoredObject
from cache_server.tiers.base import MappedObject
from kvfuse.errors import InvalidObjectError
from kvfuse.transport.crc import crc32
from kvfuse.transport.lmcache_wire import ObjectInfo

RECORD_HEAD = struct.Struct("<4siiiiiii")  # magic, fmt, dtype, shape[4], reserved (0)
MAGIC = b"LMC1"


def storage_key(key: bytes) -> str:
    """Where an LMCache key's object is stored: a digest, since keys are up to 150 bytes of any
    text and storage keys are 64 hex chars."""
    return f"{LMCACHE_NAMESPACE}/{hashlib.sha256(key).hexdigest()}"


def pack_head(info: ObjectInfo) -> bytes:
    """Record 0 of an object described by `info`."""
    return RECORD_HEAD.pack(MAGIC, info.fmt, info.dtype, *info.shape, 0)


def to_stored(key: bytes, info: ObjectInfo, payload: bytes) -> StoredObject:
    """The stored object of LMCache key `key`, described by `info`, holding `payload`."""
    records = (pack_head(info), payload)
    meta = ObjectMeta(
        key=storage_key(key), num_layers=len(records), num_tokens=1, num_kv_heads=1,
        head_dim=1, dtype="float16", codec=LMCACHE_CODEC, position_offset=0,
        layer_nbytes=tuple(len(r) for r in records), layer_crc32=tuple(crc32(r) for r in records),
    )  # fmt: skip
    return StoredObject(meta, records)


def from_stored(obj: StoredObject | MappedObject) -> tuple[ObjectInfo, bytes | memoryview]:
    """LMCache's metadata of a stored object and its payload (the stored bytes, or a view of
    the mapped file: no copy).

    Raises:
        InvalidObjectError: the object is not an LMCache object (another codec, a bad head).
    """
    if obj.meta.codec != LMCACHE_CODEC or obj.meta.num_layers not in (1, 2):
        raise InvalidObjectError(f"{obj.meta.key} is not an LMCache object")
    head = obj.layers[0]
    if len(head) < RECORD_HEAD.size or (obj.meta.num_layers == 2 and len(head) != RECORD_HEAD.size):
        raise InvalidObjectError(f"{obj.meta.key}: LMCache header of {len(head)} bytes")
    magic, fmt, dtype, *dims, _reserved = RECORD_HEAD.unpack_from(head)
    if magic != MAGIC:
        raise InvalidObjectError(f"{obj.meta.key}: LMCache record has magic {magic!r}")
    payload = obj.layers[1] if obj.meta.num_layers == 2 else memoryview(head)[RECORD_HEAD.size :]
    return ObjectInfo(fmt, dtype, (dims[0], dims[1], dims[2], dims[3]), len(payload)), payload
