"""GetLayers frames on the wire without protobuf objects: one copy to encode, none to parse.

A `GetLayersResponse{frames: LayerFrames{frames: [LayerFrame{..., data}, ...]}}` is ordinary
protobuf wire format, so the server can write it as tags, lengths, the small fields and the
data (one join) and the client can find each `data` inside the received bytes as a
memoryview. Going through protobuf objects copies the data three times on each side
(assignment, serialization, and every read of a bytes field), which capped GetLayers
throughput on CPU.

Field numbers come from the generated descriptors, so the `.proto` stays the single source;
unknown fields are skipped, as protobuf does. Key headers still travel as regular messages:
`parse_frames` returns None for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

from kvfuse.errors import InvalidObjectError
from kvfuse.v1 import cache_pb2, common_pb2

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_RESPONSE = cache_pb2.GetLayersResponse.DESCRIPTOR
_ONEOF_NOS = {f.number for f in _RESPONSE.oneofs_by_name["kind"].fields}
_FRAME_NO = _RESPONSE.fields_by_name["frame"].number
_FRAMES_NO = _RESPONSE.fields_by_name["frames"].number
_ITEM_NO = cache_pb2.LayerFrames.DESCRIPTOR.fields_by_name["frames"].number
_FRAME_FIELDS = {f.number: f.name for f in common_pb2.LayerFrame.DESCRIPTOR.fields}
_DATA_NO = common_pb2.LayerFrame.DESCRIPTOR.fields_by_name["data"].number
_MAX_VARINT_BYTES = 10
_U32 = 0xFFFFFFFF


class FrameView(NamedTuple):
    """A LayerFrame without a message object: the same field names; when parsed, `data` is a
    memoryview into the received bytes (valid as long as they are)."""

    key: str
    layer_idx: int
    record_nbytes: int
    record_crc32: int
    offset: int
    data: bytes | memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | _LEN)


_FRAMES_TAG, _ITEM_TAG, _DATA_TAG = _tag(_FRAMES_NO), _tag(_ITEM_NO), _tag(_DATA_NO)


def encode_frames(frames: Sequence[FrameView]) -> bytes:
    """The serialized GetLayersResponse carrying `frames` in order, as `frames` (one copy of
    their data; parses equal to protobuf's own serialization)."""
    parts: list[bytes | memoryview] = []
    for frame in frames:
        head = common_pb2.LayerFrame(
            key=frame.key,
            layer_idx=frame.layer_idx,
            record_nbytes=frame.record_nbytes,
            record_crc32=frame.record_crc32,
            offset=frame.offset,
        ).SerializeToString()
        data_len = _varint(len(frame.data))
        frame_len = len(head) + len(_DATA_TAG) + len(data_len) + len(frame.data)
        parts += (_ITEM_TAG, _varint(frame_len), head, _DATA_TAG, data_len, frame.data)
    body_len = _varint(sum(map(len, parts)))
    return b"".join((_FRAMES_TAG, body_len, *parts))


def serialize_response(response: bytes | cache_pb2.GetLayersResponse) -> bytes:
    """gRPC response serializer for GetLayers: pre-encoded frames pass through untouched."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def parse_frames(raw: bytes) -> list[FrameView] | None:
    """The frames of a serialized GetLayersResponse in order, or None when it is a key header.

    Raises:
        InvalidObjectError: the bytes are not a well-formed GetLayersResponse.
    """
    view = memoryview(raw)
    kind, span = 0, (0, 0)
    for number, value in _fields(view, 0, len(view)):
        if number in _ONEOF_NOS and isinstance(value, tuple):  # the last member set wins
            kind, span = number, value
    if kind == _FRAME_NO:
        return [_parse_frame(view, *span)]
    if kind != _FRAMES_NO:
        return None
    items = _fields(view, *span)
    return [_parse_frame(view, *v) for n, v in items if n == _ITEM_NO and isinstance(v, tuple)]


def _parse_frame(view: memoryview, start: int, stop: int) -> FrameView:
    key, data = "", view[0:0]
    ints = dict.fromkeys(("layer_idx", "record_nbytes", "record_crc32", "offset"), 0)
    for number, value in _fields(view, start, stop):
        name = _FRAME_FIELDS.get(number)  # unknown or mismatched fields are skipped (protobuf)
        if isinstance(value, tuple) and name in ("key", "data"):
            part = view[value[0] : value[1]]
            if name == "key":
                key = _utf8(part)
            else:
                data = part
        elif isinstance(value, int) and name in ints:
            ints[name] = value
    return FrameView(
        key,
        ints["layer_idx"] & _U32,  # protobuf truncates uint32 fields the same way
        ints["record_nbytes"],
        ints["record_crc32"] & _U32,
        ints["offset"],
        data,
    )


def _utf8(data: memoryview) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidObjectError("LayerFrame key is not UTF-8") from exc


def _fields(view: memoryview, pos: int, end: int) -> Iterator[tuple[int, int | tuple[int, int]]]:
    """(field number, value) of each varint or length-delimited field in view[pos:end]; the
    value of a length-delimited one is its (start, stop) span. Fixed-width fields are skipped
    (LayerFrame has none)."""
    while pos < end:
        tag, pos = _read_varint(view, pos, end)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidObjectError("malformed frame: field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(view, pos, end)
            yield number, value
        elif wire_type == _LEN:
            length, pos = _read_varint(view, pos, end)
            if length > end - pos:
                raise InvalidObjectError("malformed frame: truncated field")
            yield number, (pos, pos + length)
            pos += length
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > end:
                raise InvalidObjectError("malformed frame: truncated field")
        else:
            raise InvalidObjectError(f"malformed frame: wire type {wire_type}")


def _read_varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    for idx in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        byte = view[idx]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, idx + 1
        shift += 7
    raise InvalidObjectError("malformed frame: bad varint")
