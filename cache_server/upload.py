"""One Put stream turned into a validated StoredObject: header first, then every layer in order."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import TypeVar

from cache_server import wire
from cache_server.budget import Reservation, UploadBudget
from cache_server.objects import ObjectMeta, StoredObject
from cache_server.records import RecordCodec
from kvfuse.closing import Closing
from kvfuse.errors import CapacityError, InvalidObjectError
from kvfuse.transport.records import RecordAssembler
from kvfuse.v1 import cache_pb2

T = TypeVar("T")


class Upload(Closing):
    """Collects the messages of one Put stream and builds the object they describe.

    Order of calls: `add` for every message, then `finish`, and `close` in any case (or use it
    as a context manager). Validates everything before anything is stored: one header first, a
    known codec, the object within `max_object_bytes`, its announced size reserved in the
    server's `budget` (CapacityError when it does not fit, before any record is read), frames
    contiguous and in layer order, each record's size and CRC32 as announced in the header
    (CorruptRecordError → DATA_LOSS when the bytes do not match), each record decoding to the
    header's shape and dtype. Memory is bounded by the header's sizes, which the reservation
    counts until `close`. Not thread-safe (one per stream).
    """

    def __init__(
        self, tenant: str, codecs: RecordCodec, max_object_bytes: int, budget: UploadBudget
    ) -> None:
        self._tenant = tenant
        self._codecs = codecs
        self._max_object_bytes = max_object_bytes
        self._budget = budget
        self._reservation: Reservation | None = None
        self._meta: ObjectMeta | None = None
        self._assembler: RecordAssembler | None = None
        self._layers: list[bytes] = []
        self._num_layer_bytes = 0  # bytes of the complete records in _layers

    def close(self) -> None:
        """Gives the reservation back (after the commit, a failure or a cancellation)."""
        if self._reservation is not None:
            self._reservation.release()

    @property
    def key(self) -> str | None:
        """The client's chunk key once the header arrived."""
        return None if self._meta is None else wire.chunk_key_of(self._meta.key)

    def add(self, request: cache_pb2.PutRequest) -> None:
        """Takes the next message of the stream."""
        kind = request.WhichOneof("kind")
        if kind == "header":
            self._start(request.header)
        elif kind == "frame":
            self._add_frame(request)
        else:
            raise InvalidObjectError("empty PutRequest: expected a header or a frame")

    def finish(self) -> StoredObject:
        """The complete object; InvalidObjectError if the stream stopped short."""
        meta = self._meta
        if meta is None:
            raise InvalidObjectError("put stream ended without a header")
        if len(self._layers) != meta.num_layers or self._assembler_busy():
            raise InvalidObjectError(
                f"put stream truncated: {len(self._layers)} of {meta.num_layers} layers arrived"
            )
        return StoredObject(meta, tuple(self._layers))

    def _assembler_busy(self) -> bool:
        return self._assembler is not None and self._assembler.in_progress

    def _start(self, header: cache_pb2.PutHeader) -> None:
        if self._meta is not None:
            raise InvalidObjectError("duplicate header in put stream")
        meta = wire.meta_from_proto(header.meta, self._tenant)
        self._codecs.codec(meta.codec)  # CodecError for an unknown codec
        if meta.total_nbytes > self._max_object_bytes:
            raise CapacityError(
                f"object of {meta.total_nbytes} bytes exceeds the "
                f"{self._max_object_bytes}-byte object limit"
            )
        what = f"put of {wire.chunk_key_of(meta.key)}"
        self._reservation = self._budget.reserve(meta.total_nbytes, what)
        self._meta = meta
        self._assembler = RecordAssembler(max(meta.layer_nbytes))

    def _add_frame(self, request: cache_pb2.PutRequest) -> None:
        meta, assembler, reservation = self._meta, self._assembler, self._reservation
        if meta is None or assembler is None or reservation is None:
            raise InvalidObjectError("put stream must start with a header")
        frame = request.frame
        idx = len(self._layers)
        if frame.key not in ("", wire.chunk_key_of(meta.key)):
            raise InvalidObjectError(f"frame for key {frame.key[:80]!r} in a put of {self.key}")
        if idx >= meta.num_layers:
            raise InvalidObjectError(
                f"one frame too many: a frame for layer {frame.layer_idx} after all "
                f"{meta.num_layers} layers the header announced arrived"
            )
        if frame.layer_idx != idx:
            raise InvalidObjectError(f"frame for layer {frame.layer_idx}, expected layer {idx}")
        if (frame.record_nbytes, frame.record_crc32) != (
            meta.layer_nbytes[idx],
            meta.layer_crc32[idx],
        ):
            raise InvalidObjectError(f"layer {idx}: frame size/CRC32 differ from the header")
        frame.key = wire.chunk_key_of(meta.key)  # may be left empty by the client
        record = assembler.feed(frame)
        if record is not None:
            data = bytes(record.data)  # already bytes (protobuf frames): no copy
            self._num_layer_bytes += len(data)
            self._codecs.check(meta, idx, data)
            self._codecs.observe_ratio(meta, meta.codec, data)
            self._layers.append(data)
        reservation.received_total(self._num_layer_bytes + assembler.num_buffered)


class CommitLocks:
    """Serializes commits per key so that concurrent puts of one key store exactly one object.

    Striped: keys hash onto a fixed set of locks. Thread-safe.
    """

    def __init__(self, num_stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(num_stripes)]

    def run(self, key: str, commit: Callable[[], T]) -> T:
        """`commit()` under the key's lock (a check for the key and the put that follows it)."""
        with self._locks[zlib.crc32(key.encode()) % len(self._locks)]:
            return commit()
