"""LMCache objects as stored objects: their keys, and one record holding LMCache's header + payload.

An LMCache PUT carries a key string, a memory format, a dtype, a 4-d shape and `length` payload
bytes. It is stored as a `StoredObject` with a single layer record:

    record = "LMC1" | fmt | dtype | shape[4] | 0   (32 bytes, little-endian int32s) | payload

under the storage key `_lmcache/<SHA-256 of the key string>` (`LMCACHE_NAMESPACE`, which no
tenant can name). Its metadata has codec `lmcache` (every tier stores the record as it is:
nothing is transcoded, so a GET returns the same bytes from memory, disk or Redis) and the
record's size and CRC-32, which the disk and Redis tiers check on every read. The K/V fields of
`ObjectMeta` do not apply to such an object and are fixed placeholders (1 layer, 1 token, 1
head, head_dim 1, float16); the record's header is the only source of LMCache's metadata.
"""

from __future__ import annotations

import hashlib
import struct

from cache_server.objects import LMCACHE_CODEC, LMCACHE_NAMESPACE, ObjectMeta, StoredObject
from kvfuse.errors import InvalidObjectError
from kvfuse.transport.crc import crc32
from kvfuse.transport.lmcache_wire import ObjectInfo

# magic, fmt, dtype, shape[4], reserved (0): 32 bytes, so the payload keeps the record's 16-byte
# alignment (a bytes object's data), as the tensors viewed over it would want.
RECORD_HEAD = struct.Struct("<4siiiiiii")
MAGIC = b"LMC1"


def storage_key(key: bytes) -> str:
    """Where an LMCache key's object is stored: a digest, since keys are up to 150 bytes of any
    text and storage keys are 64 hex chars."""
    return f"{LMCACHE_NAMESPACE}/{hashlib.sha256(key).hexdigest()}"


def pack_head(info: ObjectInfo) -> bytes:
    """The record's first `RECORD_HEAD.size` bytes for an object described by `info`."""
    return RECORD_HEAD.pack(MAGIC, info.fmt, info.dtype, *info.shape, 0)


def to_stored(key: bytes, record: bytes) -> StoredObject:
    """The stored object of LMCache key `key` whose record (head + payload) is `record`."""
    meta = ObjectMeta(
        key=storage_key(key), num_layers=1, num_tokens=1, num_kv_heads=1, head_dim=1,
        dtype="float16", codec=LMCACHE_CODEC, position_offset=0,
        layer_nbytes=(len(record),), layer_crc32=(crc32(record),),
    )  # fmt: skip
    return StoredObject(meta, (record,))


def from_stored(obj: StoredObject) -> tuple[ObjectInfo, memoryview]:
    """LMCache's metadata of a stored object and its payload (a view of the record, no copy).

    Raises:
        InvalidObjectError: the object is not an LMCache object (another codec, a bad head).
    """
    record = obj.layers[0]
    if obj.meta.codec != LMCACHE_CODEC or obj.meta.num_layers != 1:
        raise InvalidObjectError(f"{obj.meta.key} is not an LMCache object")
    if len(record) < RECORD_HEAD.size:
        raise InvalidObjectError(f"{obj.meta.key}: LMCache record of {len(record)} bytes")
    magic, fmt, dtype, *dims, _reserved = RECORD_HEAD.unpack_from(record)
    if magic != MAGIC:
        raise InvalidObjectError(f"{obj.meta.key}: LMCache record has magic {magic!r}")
    payload = memoryview(record)[RECORD_HEAD.size :]
    return ObjectInfo(fmt, dtype, (dims[0], dims[1], dims[2], dims[3]), len(payload)), payload
