"""layer_frames: hand-encoded GetLayers frames equal protobuf's, and parsing them copies nothing."""

from __future__ import annotations

import os
import zlib

import pytest

from kvfuse.errors import InvalidObjectError
from kvfuse.transport.crc import crc32
from kvfuse.transport.layer_frames import FrameView, encode_frames, parse_frames
from kvfuse.v1 import cache_pb2, common_pb2

KEY = "ab" * 32


def _frames(sizes: list[int]) -> list[FrameView]:
    return [
        FrameView(KEY, idx, 1 << 33, 0xFFFF_FFF0 + idx, idx * 7, os.urandom(n))
        for idx, n in enumerate(sizes)
    ]


def _as_proto(frame: FrameView) -> common_pb2.LayerFrame:
    fields = frame._asdict()
    fields["data"] = bytes(fields["data"])
    return common_pb2.LayerFrame(**fields)


@pytest.mark.parametrize("sizes", [[0], [1], [200], [5, 0, 300_000], [1 << 20, 3]])
def test_encoded_frames_parse_as_protobuf(sizes: list[int]) -> None:
    frames = _frames(sizes)
    parsed = cache_pb2.GetLayersResponse.FromString(encode_frames(frames))
    assert parsed.WhichOneof("kind") == "frames"
    assert list(parsed.frames.frames) == [_as_proto(f) for f in frames]


@pytest.mark.parametrize("sizes", [[0], [200], [5, 0, 300_000]])
def test_parse_reads_encoded_and_protobuf_frames_alike(sizes: list[int]) -> None:
    frames = _frames(sizes)
    batch = cache_pb2.GetLayersResponse(
        frames=cache_pb2.LayerFrames(frames=[_as_proto(f) for f in frames])
    ).SerializeToString()
    single = cache_pb2.GetLayersResponse(frame=_as_proto(frames[0])).SerializeToString()
    for raw, expected in ((encode_frames(frames), frames), (batch, frames), (single, frames[:1])):
        parsed = parse_frames(raw)
        assert parsed is not None
        assert [f._replace(data=bytes(f.data)) for f in parsed] == expected


def test_parsed_data_is_a_view_of_the_message() -> None:
    raw = encode_frames(_frames([4096]))
    (frame,) = parse_frames(raw) or []
    assert isinstance(frame.data, memoryview) and frame.data.obj is raw


def test_header_is_not_a_frame() -> None:
    header = cache_pb2.GetLayersResponse(header=cache_pb2.KeyHeader(key=KEY, found=True))
    assert parse_frames(header.SerializeToString()) is None


def test_unknown_fields_are_skipped() -> None:
    frame = _frames([10])[0]
    inner = _as_proto(frame).SerializeToString() + b"\x78\x05" + b"\x82\x01\x02hi" + b"\x7d1234"
    raw = b"\x1a" + bytes([len(inner) + 2]) + b"\x0a" + bytes([len(inner)]) + inner
    assert parse_frames(raw) == [frame._replace(data=memoryview(frame.data))]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x12",  # frame tag without a length
        b"\x12\x05abc",  # length past the end
        b"\x12\x02\x10",  # truncated varint inside the frame
        b"\x12\x0b" + b"\x10" + b"\xff" * 10,  # varint longer than 10 bytes
        b"\x00\x01",  # field number 0
        b"\x13\x00",  # wire type 3 (groups)
        b"\x12\x03\x0a\x01\xff",  # key not UTF-8
    ],
)
def test_malformed_messages_are_rejected(raw: bytes) -> None:
    with pytest.raises(InvalidObjectError):
        parse_frames(raw)


def test_crc32_matches_zlib() -> None:
    data = os.urandom(100_003)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[50:], crc32(data[:50])) == zlib.crc32(data)
    assert crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
