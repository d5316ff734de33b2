"""Client-side messages: results as dataclasses, tensors to Put streams, status codes to errors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from kvfuse.codecs import decode_owned
from kvfuse.errors import (
    AuthError,
    CacheError,
    CapacityError,
    CodecError,
    CorruptRecordError,
    InvalidObjectError,
    KvfuseError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from kvfuse.kv import LayerFrame
from kvfuse.transport import layer_frames
from kvfuse.transport.crc import crc32
from kvfuse.transport.messages import from_message
from kvfuse.transport.protocol import DTYPE_NAMES, check_chunk_key
from kvfuse.transport.records import Record, RecordAssembler, fill_frame, frame_parts
from kvfuse.v1 import cache_pb2, common_pb2

GET_LAYERS_METHOD = "/kvfuse.v1.CacheService/GetLayers"
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_ERRORS: dict[grpc.StatusCode, type[CacheError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidObjectError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CapacityError,
    grpc.StatusCode.DATA_LOSS: CorruptRecordError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailableError,
}


@dataclass(frozen=True)
class Entry:
    """A stored chunk as the server reports it.

    Attributes:
        key: the chunk key (64 hex). tier: the fastest tier holding it. nbytes: encoded size.
        pinned: protected from eviction. num_layers, num_tokens, num_kv_heads, head_dim: each
            layer's K/V is [num_tokens, num_kv_heads, head_dim]. dtype: what K/V decode to.
        codec: how the records are stored. position_offset: first RoPE position of K.
    """

    key: str
    tier: str
    nbytes: int
    pinned: bool
    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    codec: str
    position_offset: int


@dataclass(frozen=True)
class ObjectHeat:
    """A stored object of any tenant as the admin-only Heat call ranks it.

    Attributes:
        storage_key: "<tenant>/<chunk key>" (what `move_stored` takes). tier, codec, nbytes,
            pinned: where and how it is stored. heat: lookups that found it, decayed.
    """

    storage_key: str
    tier: str
    codec: str
    nbytes: int
    pinned: bool
    heat: float


@dataclass(frozen=True)
class PutResult:
    """What a `put` did, as the server reports it after its commit.

    Attributes:
        stored: the object is stored now (by this put, or it already was); a lookup finds it.
        created: this put stored it (False: it was stored already, or no tier kept it).
        tier: where it is stored ("" when not stored).
        reason: why it was not stored ("" when it was): "admission" (the memory tier's
            frequency-based admission declined it, the objects it would evict being read more
            often, and no lower tier took it), "capacity" (a lower tier had no room),
            "unavailable" (the lower tier that would have taken it is down).
    """

    stored: bool
    created: bool
    tier: str
    reason: str


@dataclass(frozen=True)
class TierInfo:
    """One tier's counters from `stats()` (counters are totals since the server started).

    The counters (stored_bytes through num_rejected) span every tenant, so only the server's
    admin tenant gets them; for other tenants they are 0 and `counters_hidden` is True.
    """

    name: str
    up: bool
    codec: str
    capacity_bytes: int
    stored_bytes: int
    num_objects: int
    num_pinned: int
    num_evictions: int
    num_corrupt: int
    num_rejected: int
    counters_hidden: bool


def put_result_from_proto(pb: cache_pb2.PutResponse) -> PutResult:
    # A server older than the `stored` field reports a tier exactly when the key is stored.
    stored = pb.stored or (bool(pb.tier) and not pb.reason)
    return PutResult(stored=stored, created=pb.created and stored, tier=pb.tier, reason=pb.reason)


def entry_from_proto(pb: cache_pb2.Entry) -> Entry | None:
    if not pb.found:
        return None
    m = pb.meta
    return Entry(pb.key, pb.tier, pb.nbytes, pb.pinned, m.num_layers, m.num_tokens,
                 m.num_kv_heads, m.head_dim, m.dtype, m.codec, m.position_offset)  # fmt: skip


def tier_from_proto(pb: cache_pb2.TierStats) -> TierInfo:
    return from_message(pb, TierInfo)


def encode_layers(
    key: str,
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    codec: str,
    position_offset: int,
) -> tuple[common_pb2.ObjectMeta, list[bytes]]:
    """Encodes every layer's (K, V), each [T, H_kv, D], with `codec`; returns meta and records."""
    from kvfuse.codecs import get_codec

    check_chunk_key(key)
    if not layers:
        raise InvalidObjectError("an object needs at least one layer")
    k0 = layers[0][0]
    if k0.dim() != 3 or k0.dtype not in DTYPE_NAMES:
        raise InvalidObjectError(f"K must be [T, H_kv, D] float32/bfloat16/float16, got "
                                 f"{tuple(k0.shape)} {k0.dtype}")  # fmt: skip
    for idx, (k, v) in enumerate(layers):
        if k.shape != k0.shape or v.shape != k0.shape or {k.dtype, v.dtype} != {k0.dtype}:
            raise InvalidObjectError(f"layer {idx}: K/V shape or dtype differs from layer 0")
    encoder = get_codec(codec)
    records = [encoder.encode(k, v, i, len(layers)) for i, (k, v) in enumerate(layers)]
    num_tokens, num_kv_heads, head_dim = k0.shape
    meta = common_pb2.ObjectMeta(
        key=key,
        num_layers=len(layers),
        num_tokens=num_tokens,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=DTYPE_NAMES[k0.dtype],
        codec=codec,
        position_offset=position_offset,
        layer_nbytes=[len(r) for r in records],
        layer_crc32=[crc32(r) for r in records],
    )
    return meta, records


def put_requests(
    meta: common_pb2.ObjectMeta, records: Sequence[bytes]
) -> Iterator[cache_pb2.PutRequest]:
    """The Put stream: the header, then each record's frames in layer order."""
    yield cache_pb2.PutRequest(header=cache_pb2.PutHeader(meta=meta))
    for idx, record in enumerate(records):
        for offset, data in frame_parts(record):
            request = cache_pb2.PutRequest()  # filled in place: no second copy of the data
            fill_frame(request.frame, "", idx, len(record), meta.layer_crc32[idx], offset, data)
            yield request


def error_from_rpc(exc: grpc.RpcError) -> KvfuseError:
    """The kvfuse error for a failed call (its status code and the server's message)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return error_for_status(code, details)


def error_for_status(code: grpc.StatusCode, details: str) -> KvfuseError:
    """The kvfuse error for a status code and the server's message."""
    return _ERRORS.get(code, CacheError)(f"{code.name}: {details}")


def get_layers_request(
    keys: Sequence[str], layers: range | None, codec: str | None
) -> cache_pb2.GetLayersRequest:
    """A GetLayers request; `layers` is a contiguous range (step 1) or None for all."""
    if layers is not None and (layers.step != 1 or len(layers) == 0 or layers.start < 0):
        raise InvalidObjectError(f"layers must be a non-empty range with step 1, got {layers}")
    return cache_pb2.GetLayersRequest(
        keys=[check_chunk_key(k) for k in keys],
        layer_start=0 if layers is None else layers.start,
        layer_stop=0 if layers is None else layers.stop,
        codec=codec or "",
    )


class LayerDecoder:
    """Turns a GetLayers response stream into headers and decoded LayerFrames, checking it.

    Takes each response as the serialized bytes (`layer_frames`: layer data is read in place,
    not copied out of a message). `feed` returns what one response completes: a (key, found)
    pair for a header, LayerFrames for the records it finishes. CorruptRecordError when a
    record fails its checksum, CacheError when the stream breaks the protocol. Not thread-safe
    (one per stream).
    """

    def __init__(self, max_record_bytes: int) -> None:
        # Every record is decoded by its codec, which checks the payload's own CRC-32.
        self._assembler = RecordAssembler(max_record_bytes, verify_crc32=False)
        self._found: set[str] = set()
        self._frames_started = False

    def feed(self, raw: bytes) -> list[tuple[str, bool] | LayerFrame]:
        try:
            frames = layer_frames.parse_frames(raw)
            if frames is None:
                return [self._header(raw)]
            self._frames_started = True
            records = [r for r in map(self._assembler.feed, frames) if r is not None]
        except InvalidObjectError as exc:
            raise CacheError(f"protocol error: {exc}") from exc
        return [self._decode(record) for record in records]

    def _decode(self, record: Record) -> LayerFrame:
        if record.key not in self._found:
            raise CacheError(f"protocol error: layer frame for unannounced key {record.key}")
        try:
            k, v = decode_owned(record.data)  # the received message is ours alone: no copy
        except CodecError as exc:
            raise CorruptRecordError(f"{record.key}: layer {record.layer_idx}: {exc}") from exc
        return LayerFrame(record.key, record.layer_idx, k, v)

    def _header(self, raw: bytes) -> tuple[str, bool]:
        response = cache_pb2.GetLayersResponse.FromString(raw)
        if response.WhichOneof("kind") != "header":
            raise CacheError("protocol error: a response with neither header nor frames")
        if self._frames_started:
            raise CacheError("protocol error: key header after layer frames")
        if response.header.found:
            self._found.add(response.header.key)
        return response.header.key, response.header.found


def get_layers_method(channel: Any) -> Any:
    """The GetLayers callable of `channel` (blocking or asyncio) yielding serialized responses."""
    return channel.unary_stream(
        GET_LAYERS_METHOD,
        request_serializer=cache_pb2.GetLayersRequest.SerializeToString,
        response_deserializer=None,  # bytes, for LayerDecoder
        _registered_method=True,
    )
