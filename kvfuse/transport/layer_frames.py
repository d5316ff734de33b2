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

from collections.abc import Sequence
from typing import NamedTuple

from kvfuse.transport import protowire
from kvfuse.v1 import cache_pb2, common_pb2

_RESPONSE = cache_pb2.GetLayersResponse.DESCRIPTOR
_ONEOF_NOS = {f.number for f in _RESPONSE.oneofs_by_name["kind"].fields}
_FRAME_NO = _RESPONSE.fields_by_name["frame"].number
_FRAMES_NO = _RESPONSE.fields_by_name["frames"].number
_ITEM_NO = cache_pb2.LayerFrames.DESCRIPTOR.fields_by_name["frames"].number
_FRAMES_TAG, _ITEM_TAG = protowire.len_tag(_FRAMES_NO), protowire.len_tag(_ITEM_NO)
_DATA_TAG = protowire.len_tag(common_pb2.LayerFrame.DESCRIPTOR.fields_by_name["data"].number)


class FrameView(NamedTuple):
    """A LayerFrame without a message object: the same field names; when parsed, `data` is a
    memoryview into the received bytes (valid as long as they are)."""

    key: str
    layer_idx: int
    record_nbytes: int
    record_crc32: int
    offset: int
    data: bytes | memoryview


def encode_frames(frames: Sequence[FrameView]) -> bytes:
    """The serialized GetLayersResponse carrying `frames` in order, as `frames` (one copy of
    their data; parses equal to protobuf's own serialization)."""
    parts: list[protowire.Part] = []
    for frame in frames:
        head = common_pb2.LayerFrame(
            key=frame.key,
            layer_idx=frame.layer_idx,
            record_nbytes=frame.record_nbytes,
            record_crc32=frame.record_crc32,
            offset=frame.offset,
        ).SerializeToString()
        parts += protowire.len_field(_ITEM_TAG, protowire.with_data(head, _DATA_TAG, frame.data))
    return b"".join(protowire.len_field(_FRAMES_TAG, parts))


def parse_frames(raw: bytes) -> list[FrameView] | None:
    """The frames of a serialized GetLayersResponse in order, or None when it is a key header.

    Raises:
        InvalidObjectError: the bytes are not a well-formed GetLayersResponse.
    """
    view = memoryview(raw)
    found = protowire.last_of(view, _ONEOF_NOS)
    if found is None or found[0] not in (_FRAME_NO, _FRAMES_NO):
        return None
    number, span = found
    if number == _FRAME_NO:
        return [_parse_frame(view, span)]
    items = protowire.fields(view, *span)
    return [_parse_frame(view, v) for n, v in items if n == _ITEM_NO and isinstance(v, tuple)]


def _parse_frame(view: memoryview, span: protowire.Span) -> FrameView:
    frame = protowire.read_scalars(view, span, common_pb2.LayerFrame.DESCRIPTOR)
    return FrameView(
        frame.text("key"),
        frame.integer("layer_idx"),
        frame.integer("record_nbytes"),
        frame.integer("record_crc32"),
        frame.integer("offset"),
        frame.data("data"),
    )
