"""The shared payload header: field round trip, every rejection, and the bounded body reader."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from kvfuse.codecs import header
from kvfuse.codecs.header import HEADER_SIZE, MAGIC, BodyReader, CodecId, Header
from kvfuse.errors import CodecError

BODY = bytes(range(48))


def make(
    codec_id: int = 1,
    dtype: int = 1,
    flags: int = 0,
    dims: tuple[int, int, int] = (2, 3, 4),
    version: int = 1,
) -> bytes:
    """A payload with arbitrary header fields, BODY, and a correct CRC."""
    fields = struct.pack("<4sBBBBIII", MAGIC, version, codec_id, dtype, flags, *dims)
    return fields + struct.pack("<I", zlib.crc32(BODY, zlib.crc32(fields))) + BODY


def test_valid_payload_parses() -> None:
    assert header.parse(make(), CodecId.RAW).shape == (2, 3, 4)


def test_pack_parse_round_trip() -> None:
    head = Header(CodecId.INT8, torch.bfloat16, 5, 2, 16)
    payload = header.pack(head, [b"ab", b"cd"])
    assert len(payload) == HEADER_SIZE + 4 and payload[:4] == b"KVFC"
    assert header.parse(payload, CodecId.INT8) == head
    assert head.shape == (5, 2, 16) and head.num_elements == 160
    assert header.peek_codec_id(payload) is CodecId.INT8


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "shorter than the header"),
        (make()[: HEADER_SIZE - 1], "shorter than the header"),
        (b"KVFX" + make()[4:], "bad magic"),
        (make(version=2), "unsupported format version 2"),
        (make(version=0), "unsupported format version 0"),
        (make(codec_id=99), "unknown codec id 99"),
        (make(codec_id=0), "unknown codec id 0"),
        (make(dtype=9), "unknown dtype code 9"),
        (make(flags=1), "unknown flags"),
        (make(dims=(0, 3, 4)), "T=0"),
        (make(dims=(2, 0, 4)), "H=0"),
        (make(dims=(2, 3, 2000)), "D=2000"),
        (make(dims=(2**32 - 1, 3, 4)), "T=4294967295"),
        (make(dims=(10**6, 1000, 1000)), "exceeds"),  # 10^12 elements claimed
        (make(dims=(10**6, 1, 4)), "cannot hold"),  # within limits, but 72 bytes can't hold it
        (make()[:-1], "checksum"),
        (make()[:-1] + b"\xff", "checksum"),
    ],
)
def test_parse_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        header.parse(payload, CodecId.RAW)


def test_parse_rejects_other_codec_and_non_bytes() -> None:
    with pytest.raises(CodecError, match="payload is raw, not int4"):
        header.parse(make(), CodecId.INT4)
    with pytest.raises(CodecError, match="must be bytes"):
        header.parse("KVFC", CodecId.RAW)  # type: ignore[arg-type]


def test_check_dims_limits() -> None:
    header.check_dims(1, 1, 1)
    header.check_dims(header.MAX_TOKENS, 1, 1)
    for dims in [(0, 1, 1), (header.MAX_TOKENS + 1, 1, 1), (1, header.MAX_HEADS + 1, 1)]:
        with pytest.raises(CodecError):
            header.check_dims(*dims)
    with pytest.raises(CodecError, match="exceeds"):
        header.check_dims(header.MAX_TOKENS, header.MAX_HEADS, 1)


def test_body_reader_is_bounded() -> None:
    reader = BodyReader(bytes(HEADER_SIZE) + np.arange(3, dtype="<u4").tobytes() + b"\x07")
    assert reader.array(np.uint32, 2).tolist() == [0, 1]
    assert reader.num_bytes_left == 5
    with pytest.raises(CodecError, match="truncated"):
        reader.array(np.uint32, 2)
    with pytest.raises(CodecError, match="truncated"):
        reader.array(np.uint8, 10**12)  # rejected before any allocation
    with pytest.raises(CodecError, match="trailing"):
        reader.finish()
    assert reader.scalar(np.uint32) == 2 and reader.scalar(np.uint8) == 7
    reader.finish()


def test_body_reader_arrays_are_writable_copies() -> None:
    payload = bytes(HEADER_SIZE) + b"\x01\x02"
    out = BodyReader(payload).array(np.uint8, 2)
    out[0] = 9  # would raise on a read-only view of `payload`
    assert payload[HEADER_SIZE] == 1
