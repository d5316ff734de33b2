"""Stored objects: metadata plus one encoded record per layer, with per-layer CRC32 checksums."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from kvfuse.errors import InvalidObjectError
from kvfuse.service.auth import TENANT_REGEX
from kvfuse.transport.crc import check_record
from kvfuse.transport.protocol import CHUNK_KEY_REGEX, DTYPES

# Storage keys are what the server stores under: "<tenant>/<64 hex chunk key>", a bare key, or
# "_lmcache/<64 hex>" for the LMCache port's objects: no tenant name starts with "_", so no
# kvfuse client can name, read or overwrite them (nor they a tenant's chunks).
LMCACHE_NAMESPACE = "_lmcache"
KEY_PATTERN = re.compile(f"^(?:(?:{TENANT_REGEX}|{LMCACHE_NAMESPACE})/)?{CHUNK_KEY_REGEX}$")
# The codec name of an LMCache object's single record (LMCache's header + its payload, see
# cache_server.lmcache_objects): not K/V, so every tier stores it as it is, whatever its codec.
LMCACHE_CODEC = "lmcache"
MAX_LAYERS = 1024


def check_key(key: str) -> str:
    """Returns `key` if it is a valid storage key, else raises InvalidObjectError."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise InvalidObjectError(
            f"malformed key {key!r}: expected [tenant/]<64 lowercase hex chars>"
        )
    return key


@dataclass(frozen=True)
class ObjectMeta:
    """What is known about a stored chunk without reading its layers.

    Attributes:
        key: storage key (see KEY_PATTERN).
        num_layers, num_tokens, num_kv_heads, head_dim: the decoded K/V of layer i has shape
            [num_tokens, num_kv_heads, head_dim].
        dtype: the dtype K/V decode to (a name in kvfuse.transport.protocol.DTYPES).
        codec: the codec the layer records are encoded with (kvfuse.codecs name).
        position_offset: K was rotated to positions position_offset .. +num_tokens-1.
        layer_nbytes: size of each encoded layer record.
        layer_crc32: CRC32 of each encoded layer record.
    """

    key: str
    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    position_offset: int
    layer_nbytes: tuple[int, ...]
    layer_crc32: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_nbytes", tuple(self.layer_nbytes))
        object.__setattr__(self, "layer_crc32", tuple(self.layer_crc32))
        self.check_integrity()

    @property
    def total_nbytes(self) -> int:
        return sum(self.layer_nbytes)

    def check_integrity(self) -> None:
        """Raises InvalidObjectError if the fields contradict each other."""
        check_key(self.key)
        # Metadata also arrives from disk, Redis and the network: check types before values.
        ints = (
            self.num_layers,
            self.num_tokens,
            self.num_kv_heads,
            self.head_dim,
            self.position_offset,
            *self.layer_nbytes,
            *self.layer_crc32,
        )
        if not all(type(n) is int for n in ints):
            raise InvalidObjectError("object metadata needs integer sizes, offsets and CRCs")
        if not isinstance(self.codec, str) or not self.codec:
            raise InvalidObjectError("codec must be a non-empty string")
        if not 1 <= self.num_layers <= MAX_LAYERS:
            raise InvalidObjectError(f"num_layers must be in [1, {MAX_LAYERS}]")
        for name in ("num_tokens", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise InvalidObjectError(f"{name} must be positive")
        if self.position_offset < 0:
            raise InvalidObjectError("position_offset must be >= 0")
        if self.dtype not in DTYPES:
            raise InvalidObjectError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not (len(self.layer_nbytes) == len(self.layer_crc32) == self.num_layers):
            raise InvalidObjectError("layer_nbytes and layer_crc32 need one entry per layer")
        if any(n < 0 for n in self.layer_nbytes):
            raise InvalidObjectError("layer sizes must be >= 0")
        if any(not 0 <= c <= 0xFFFFFFFF for c in self.layer_crc32):
            raise InvalidObjectError("layer CRC32s must be unsigned 32-bit integers")

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ObjectMeta:
        try:
            fields = json.loads(data)
            if not isinstance(fields, dict):
                raise TypeError("metadata must be a JSON object")
            return cls(**fields)
        except (ValueError, TypeError) as exc:
            raise InvalidObjectError(f"malformed object metadata: {exc}") from exc


@dataclass(frozen=True)
class StoredObject:
    """A complete object: metadata and its layer records (encoded K and V, one per layer)."""

    meta: ObjectMeta
    layers: tuple[bytes, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != self.meta.num_layers:
            raise InvalidObjectError(
                f"object has {len(self.layers)} layer records, metadata says {self.meta.num_layers}"
            )
        for idx, record in enumerate(self.layers):
            if not isinstance(record, bytes):  # tiers keep references: records must be immutable
                raise InvalidObjectError(f"layer {idx} record must be bytes")
            if len(record) != self.meta.layer_nbytes[idx]:
                raise InvalidObjectError(
                    f"layer {idx} has {len(record)} bytes, expected {self.meta.layer_nbytes[idx]}"
                )

    def verify_layer(self, idx: int) -> bytes:
        """The record of layer `idx` after checking its CRC32; CorruptRecordError if it fails."""
        record = self.layers[idx]
        check_record(self.meta.key, idx, record, self.meta.layer_crc32[idx])
        return record

    def verify(self) -> None:
        for idx in range(self.meta.num_layers):
            self.verify_layer(idx)
