"""Protobuf wire format by hand, for the few messages that carry bulk bytes.

Building a message with a large `bytes` field through protobuf objects copies the data on
assignment, on serialization and on every read of the field. For the layer streams (cache
GetLayers, prefill layers) kvfuse writes those messages as `tag, length, small fields, data`
with one join, and reads them by walking the fields of the received bytes, taking the large
field as a memoryview. Field numbers always come from the generated descriptors, so the
`.proto` stays the only definition. Unknown fields, and known ones of another wire type, are
skipped, as protobuf does.
"""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from kvfuse.errors import InvalidObjectError

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10
_U32_TYPES = {FieldDescriptor.TYPE_UINT32}
Span = tuple[int, int]  # [start, stop) of a length-delimited value inside the message


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def len_tag(number: int) -> bytes:
    """The tag of length-delimited field `number` (bytes, string, message)."""
    return varint(number << 3 | _LEN)


Part = bytes | memoryview


def with_data(head: bytes, data_tag: bytes, data: Part) -> tuple[Part, ...]:
    """A message as parts to join: its serialized small fields `head`, then its bytes field
    `data` (tag `data_tag`), which is not copied until the join."""
    return head, data_tag, varint(len(data)), data


def len_field(tag: bytes, parts: tuple[Part, ...] | list[Part]) -> tuple[Part, ...]:
    """`parts` (a serialized message) wrapped as the length-delimited field `tag`."""
    return tag, varint(sum(map(len, parts))), *parts


def fields(view: memoryview, start: int, stop: int) -> Iterator[tuple[int, int | Span]]:
    """(field number, value) of each varint or length-delimited field in view[start:stop]; a
    length-delimited value is its span. Fixed-width fields are skipped.

    Raises:
        InvalidObjectError: malformed bytes (bad varint, truncated field, field number 0,
            unknown wire type).
    """
    pos = start
    while pos < stop:
        tag, pos = _read_varint(view, pos, stop)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidObjectError("malformed message: field number 0")
        if wire_type == _VARINT:
            value, pos = _read_varint(view, pos, stop)
            yield number, value
        elif wire_type == _LEN:
            length, pos = _read_varint(view, pos, stop)
            if length > stop - pos:
                raise InvalidObjectError("malformed message: truncated field")
            yield number, (pos, pos + length)
            pos += length
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
            if pos > stop:
                raise InvalidObjectError("malformed message: truncated field")
        else:
            raise InvalidObjectError(f"malformed message: wire type {wire_type}")


def last_of(view: memoryview, numbers: set[int]) -> tuple[int, Span] | None:
    """The last length-delimited field among `numbers` (a oneof of messages: the last one set
    wins), as (number, span); None when none is set."""
    found = None
    for number, value in fields(view, 0, len(view)):
        if number in numbers and isinstance(value, tuple):
            found = number, value
    return found


class Scalars:
    """The integer and bytes/string fields of one message, read in place (`read_scalars`)."""

    def __init__(self, values: dict[str, int | memoryview]) -> None:
        self._values = values

    def integer(self, name: str) -> int:
        value = self._values[name]
        assert isinstance(value, int), name  # by the descriptor's field type
        return value

    def data(self, name: str) -> memoryview:
        value = self._values[name]
        assert isinstance(value, memoryview), name
        return value

    def text(self, name: str) -> str:
        """A string field (InvalidObjectError unless UTF-8)."""
        try:
            return str(self.data(name), "utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidObjectError(f"field {name} is not UTF-8") from exc


def read_scalars(view: memoryview, span: Span, descriptor: Descriptor) -> Scalars:
    """The integer and bytes/string fields of the message in `view[span]`, defaults (0,
    empty) for absent ones: integers as ints (uint32 truncated as protobuf does), bytes and
    strings as memoryviews into `view` (not copied). Message fields are not read."""
    values: dict[str, int | memoryview] = {}
    by_number = {}
    for field in descriptor.fields:
        is_len = field.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING)
        values[field.name] = view[0:0] if is_len else 0
        by_number[field.number] = (field.name, is_len, field.type in _U32_TYPES)
    for number, value in fields(view, *span):
        known = by_number.get(number)
        if known is None:
            continue
        name, is_len, is_u32 = known
        if is_len and isinstance(value, tuple):
            values[name] = view[value[0] : value[1]]
        elif not is_len and isinstance(value, int):
            values[name] = value & 0xFFFFFFFF if is_u32 else value
    return Scalars(values)


def _read_varint(view: memoryview, pos: int, stop: int) -> tuple[int, int]:
    value = shift = 0
    for idx in range(pos, min(stop, pos + _MAX_VARINT_BYTES)):
        byte = view[idx]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, idx + 1
        shift += 7
    raise InvalidObjectError("malformed message: bad varint")
