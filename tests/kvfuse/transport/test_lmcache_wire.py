"""LMCache's request and reply headers: layout, parsing and the checks made before allocating."""

from __future__ import annotations

import struct

import pytest

from kvfuse.errors import InvalidRequestError
from kvfuse.transport import lmcache_wire as wire

KV = wire.ObjectInfo(wire.MemoryFormat.KV_2LTD, wire.FLOAT16, (2, 30, 256, 192), 5_898_240)


def _header(
    command: int, info: wire.ObjectInfo, key: bytes = b"m@1@0@ab@half", loc: int = 0
) -> bytes:
    # What LMCache's ClientMetaMessage.serialize packs (native order: little-endian here).
    return struct.pack("iiiiiiiii150s", command, info.length, info.fmt, info.dtype, loc,
                       *info.shape, key.ljust(150))  # fmt: skip


def test_headers_have_lmcache_layout() -> None:
    assert wire.pack_request(wire.Command.PUT, b"m@1@0@ab@half", KV) == _header(1, KV)
    request = wire.parse_request(_header(1, KV), max_length=1 << 30)
    assert request == wire.Request(wire.Command.PUT, b"m@1@0@ab@half", KV)
    reply = wire.pack_reply(wire.ReturnCode.SUCCESS, KV)
    assert struct.unpack("iiiiiiiii", reply) == (200, KV.length, 1, 2, 2, 30, 256, 192, 0)
    assert wire.unpack_reply(reply) == (200, KV)


def test_keys_lose_their_padding_and_must_be_text() -> None:
    padded = wire.parse_request(_header(2, wire.EMPTY, b"  m@1@0@ab@half"), 0)
    assert padded.key == b"m@1@0@ab@half"  # LMCache pads with spaces and strips them
    nul_padded = wire.REQUEST.pack(2, 0, 1, 2, 0, 0, 0, 0, 0, b"m@1@0@ab@half")  # struct's NULs
    assert wire.parse_request(nul_padded, 0).key == b"m@1@0@ab@half"
    assert wire.parse_request(_header(5, wire.EMPTY, b""), 0).key == b""  # HEALTH needs none
    with pytest.raises(InvalidRequestError, match="empty"):
        wire.parse_request(_header(2, wire.EMPTY, b"   "), 0)
    with pytest.raises(InvalidRequestError, match="UTF-8"):
        wire.parse_request(_header(3, wire.EMPTY, b"\xc3\x28"), 0)
    with pytest.raises(InvalidRequestError, match="exceeds 150"):
        wire.pack_request(wire.Command.GET, b"k" * 151)


@pytest.mark.parametrize(
    ("info", "location", "error"),
    [
        (KV._replace(length=-1), 0, "limit is 6000000"),
        (KV._replace(length=6_000_001), 0, "limit is 6000000"),
        (KV._replace(fmt=99), 0, "memory format 99"),
        (KV._replace(dtype=9), 0, "dtype 9"),
        (KV, 3, "location 3"),
        (KV._replace(shape=(2, -30, 256, 192)), 0, "negative"),
        (KV._replace(shape=(2, 30, 256, 193)), 0, "needs 5928960 bytes"),
        (KV._replace(shape=(2**31 - 1,) * 4), 0, "needs"),
    ],
)
def test_put_headers_that_cannot_be_stored_are_refused(
    info: wire.ObjectInfo, location: int, error: str
) -> None:
    with pytest.raises(InvalidRequestError, match=error):
        wire.parse_request(_header(1, info, loc=location), max_length=6_000_000)


def test_shapes_size_typed_payloads_only() -> None:
    # Trailing zeros are LMCache's padding of shapes below 4-d; binary objects carry any shape.
    flat = wire.ObjectInfo(wire.MemoryFormat.EC_TD, 4, (10, 8, 0, 0), 320)
    assert wire.parse_request(_header(1, flat), 1000).info == flat
    blob = wire.ObjectInfo(wire.MemoryFormat.BINARY, 0, (2**31 - 1, 0, 0, 0), 12)
    assert wire.parse_request(_header(1, blob), 1000).info == blob
    with pytest.raises(InvalidRequestError, match="unknown LMCache command 0"):
        wire.parse_request(_header(0, wire.EMPTY), 0)
    # A GET's header fields other than the key are not used: LMCache sends constants there.
    assert wire.parse_request(_header(2, KV._replace(length=-5)), 0).command == wire.Command.GET
