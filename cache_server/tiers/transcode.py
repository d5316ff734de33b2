"""Re-encoding a stored object into another codec, as tiers with different codecs need."""

from __future__ import annotations

from dataclasses import replace

from cache_server.objects import LMCACHE_CODEC, StoredObject
from kvfuse.codecs import get_codec
from kvfuse.transport.crc import crc32


def transcode(obj: StoredObject, codec: str) -> StoredObject:
    """`obj` with every layer re-encoded by `codec` (the same object if it already is, or if
    it is an LMCache object, whose bytes are not K/V and are stored as they are).

    Raises CorruptRecordError if a source record fails its CRC32, CodecError if a codec is
    unknown or a record does not decode.
    """
    if obj.meta.codec in (codec, LMCACHE_CODEC):
        return obj
    source, target = get_codec(obj.meta.codec), get_codec(codec)
    num_layers = obj.meta.num_layers
    layers = []
    for idx in range(num_layers):
        k, v = source.decode(obj.verify_layer(idx))  # [T, H_kv, D] each
        layers.append(target.encode(k, v, idx, num_layers))
    meta = replace(
        obj.meta,
        codec=codec,
        layer_nbytes=tuple(len(r) for r in layers),
        layer_crc32=tuple(crc32(r) for r in layers),
    )
    return StoredObject(meta, tuple(layers))
