"""Layer records on the wire: split into LayerFrames of at most 4 MiB, reassembled in order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from kvfuse.errors import InvalidObjectError
from kvfuse.transport.crc import check_record, crc32
from kvfuse.transport.layer_frames import FrameView
from kvfuse.transport.protocol import MAX_FRAME_BYTES
from kvfuse.v1 import common_pb2


def frame_parts(
    record: bytes, max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of each frame of one record, in order (one part even for an empty one)."""
    if len(record) <= max_frame_bytes:
        yield 0, record  # the common case: the record as is, no slice copy
        return
    view = memoryview(record)
    for offset in range(0, len(record), max_frame_bytes):
        yield offset, bytes(view[offset : offset + max_frame_bytes])


def fill_frame(
    frame: common_pb2.LayerFrame,
    key: str,
    layer_idx: int,
    record_nbytes: int,
    record_crc32: int,
    offset: int,
    data: bytes,
) -> None:
    """Sets the fields of `frame` in place (a nested message: no copy of `data` on assignment
    into its parent, unlike `Parent(frame=LayerFrame(...))`)."""
    frame.key = key
    frame.layer_idx = layer_idx
    frame.record_nbytes = record_nbytes
    frame.record_crc32 = record_crc32
    frame.offset = offset
    frame.data = data


def split_record(
    key: str,
    layer_idx: int,
    record: bytes,
    record_crc32: int | None = None,
    max_frame_bytes: int = MAX_FRAME_BYTES,
) -> Iterator[common_pb2.LayerFrame]:
    """The frames of one layer record, in offset order (one frame even for an empty record)."""
    crc = crc32(record) if record_crc32 is None else record_crc32
    for offset, data in frame_parts(record, max_frame_bytes):
        frame = common_pb2.LayerFrame()
        fill_frame(frame, key, layer_idx, len(record), crc, offset, data)
        yield frame


Frame = common_pb2.LayerFrame | FrameView


class Record(NamedTuple):
    key: str
    layer_idx: int
    data: bytes | memoryview  # a view into the received message when it came in one frame


class _Head(NamedTuple):
    key: str
    layer_idx: int
    record_nbytes: int
    record_crc32: int


def _head(frame: Frame) -> _Head:
    return _Head(frame.key, frame.layer_idx, frame.record_nbytes, frame.record_crc32)


class RecordAssembler:
    """Reassembles a stream of LayerFrames into whole records, strictly in order.

    The frames of one record must be contiguous, start at offset 0 and follow each other
    without gaps or overlaps, with the same key, layer, size and CRC32. Raises
    InvalidObjectError on any violation, CorruptRecordError when a complete record fails its
    CRC32 (unless `verify_crc32` is off: a reader that decodes every record with a codec, whose
    payload carries its own CRC-32 over the same bytes, skips this second pass). Not
    thread-safe (one per stream).
    """

    def __init__(
        self,
        max_record_bytes: int,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        verify_crc32: bool = True,
    ) -> None:
        self._max_record_bytes = max_record_bytes
        self._max_frame_bytes = max_frame_bytes
        self._verify_crc32 = verify_crc32
        self._current: _Head | None = None
        self._parts: list[bytes | memoryview] = []
        self._num_received = 0

    @property
    def in_progress(self) -> bool:
        """True while a record has started but not all of its bytes arrived."""
        return self._current is not None

    @property
    def num_buffered(self) -> int:
        """Bytes of the record in progress received so far (0 between records)."""
        return self._num_received

    def feed(self, frame: Frame) -> Record | None:
        """Takes one frame; returns the record it completes, else None."""
        data = frame.data  # each read of a protobuf bytes field copies it: read once
        if len(data) > self._max_frame_bytes:
            raise InvalidObjectError(
                f"frame of {len(data)} bytes exceeds the {self._max_frame_bytes}-byte limit"
            )
        if self._current is None:
            self._start(frame, len(data))
        else:
            self._continue(frame, len(data))
        self._parts.append(data)
        self._num_received += len(data)
        head = self._current
        if head is None or self._num_received < head.record_nbytes:
            return None
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._current, self._parts, self._num_received = None, [], 0
        if self._verify_crc32:
            check_record(head.key, head.layer_idx, data, head.record_crc32)
        return Record(head.key, head.layer_idx, data)

    def _start(self, frame: Frame, num_data_bytes: int) -> None:
        if frame.offset != 0:
            raise InvalidObjectError(
                f"layer {frame.layer_idx}: first frame at offset {frame.offset}"
            )
        if frame.record_nbytes > self._max_record_bytes:
            raise InvalidObjectError(
                f"layer {frame.layer_idx}: record of {frame.record_nbytes} bytes exceeds the "
                f"{self._max_record_bytes}-byte limit"
            )
        if num_data_bytes > frame.record_nbytes or (frame.record_nbytes and not num_data_bytes):
            raise InvalidObjectError(f"layer {frame.layer_idx}: frame size does not fit the record")
        self._current = _head(frame)

    def _continue(self, frame: Frame, num_data_bytes: int) -> None:
        head = self._current
        assert head is not None
        if _head(frame) != head or frame.offset != self._num_received:
            raise InvalidObjectError(
                f"layer {head.layer_idx}: frame out of order (offset {frame.offset}, "
                f"expected {self._num_received} of the same record)"
            )
        if not num_data_bytes or self._num_received + num_data_bytes > head.record_nbytes:
            raise InvalidObjectError(f"layer {head.layer_idx}: frame overruns its record")
