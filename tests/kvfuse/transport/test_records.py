"""Layer records split into ≤4 MiB frames and reassembled strictly in order."""

from __future__ import annotations

import os

import pytest

from kvfuse.errors import CorruptRecordError, InvalidObjectError
from kvfuse.transport.protocol import MAX_FRAME_BYTES
from kvfuse.transport.records import RecordAssembler, split_record
from kvfuse.v1 import common_pb2

KEY = "ab" * 32


@pytest.mark.parametrize("size", [0, 1, MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, 3 * MAX_FRAME_BYTES])
def test_split_and_reassemble_round_trip(size: int) -> None:
    record = os.urandom(size)
    frames = list(split_record(KEY, 3, record))
    assert len(frames) == max(1, -(-size // MAX_FRAME_BYTES))
    assert all(len(f.data) <= MAX_FRAME_BYTES for f in frames)
    assembler = RecordAssembler(max_record_bytes=size)
    results = [assembler.feed(f) for f in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == (KEY, 3, record)
    assert not assembler.in_progress


def _frames(record: bytes, frame_bytes: int = 4) -> list[common_pb2.LayerFrame]:
    return list(split_record(KEY, 0, record, max_frame_bytes=frame_bytes))


def _feed_all(frames: list[common_pb2.LayerFrame], frame_bytes: int = 4) -> None:
    assembler = RecordAssembler(max_record_bytes=64, max_frame_bytes=frame_bytes)
    for frame in frames:
        assembler.feed(frame)


def test_rejects_gaps_reorders_and_mixed_records() -> None:
    frames = _frames(b"0123456789ab")
    with pytest.raises(InvalidObjectError):
        _feed_all([frames[1]])  # does not start at offset 0
    with pytest.raises(InvalidObjectError):
        _feed_all([frames[0], frames[2]])  # gap
    other = _frames(b"ZYXWVUTSRQPO")
    with pytest.raises(InvalidObjectError):
        _feed_all([frames[0], other[1]])  # a frame of another record


def test_rejects_oversized_frames_and_records() -> None:
    with pytest.raises(InvalidObjectError):
        _feed_all(_frames(b"x" * 8, frame_bytes=8), frame_bytes=4)
    with pytest.raises(InvalidObjectError):
        _feed_all(_frames(b"x" * 65))


def test_crc_mismatch_is_corruption() -> None:
    frames = _frames(b"0123456789ab")
    frames[1].data = b"XXXX"
    with pytest.raises(CorruptRecordError):
        _feed_all(frames)
