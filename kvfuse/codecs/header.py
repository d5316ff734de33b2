"""The header every payload starts with (magic, version, codec, dtype, shape) and a body reader."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from kvfuse.errors import CodecError
from kvfuse.transport.crc import crc32

MAGIC = b"KVFC"
FORMAT_VERSION = 1
# magic, format version, codec id, dtype code, flags, T, H_kv, D, CRC-32 of the payload's
# other bytes (the header fields before it and the whole body).
_HEADER = struct.Struct("<4sBBBBIIII")
HEADER_SIZE = _HEADER.size  # 24 bytes
_CRC_OFFSET = HEADER_SIZE - 4

# Limits checked before any allocation. One payload is one layer of one chunk.
MAX_TOKENS = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_ELEMENTS = 1 << 28  # per tensor (K or V): 1 GiB as fp32
# At most this many decoded elements (K and V together) per payload byte. Fixed-size codecs
# are far below it; the entropy-coded codec pads degenerate (constant) input to stay below it,
# so a short payload can never make a decoder allocate much more than its own size.
MAX_EXPANSION = 64


class CodecId(IntEnum):
    """Codec ids as stored in the header; never renumber, only append."""

    RAW = 1
    FP16 = 2
    INT8 = 3
    INT4 = 4
    CACHEGEN = 5


DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class Header:
    """What every payload starts with.

    Attributes:
        codec_id: which codec wrote the body.
        dtype: the dtype K and V had at encode time (and get back at decode time).
        num_tokens: T. num_heads: H_kv. head_dim: D.
        flags: codec-specific bits; format version 1 defines none, so it must be 0.
    """

    codec_id: CodecId
    dtype: torch.dtype
    num_tokens: int
    num_heads: int
    head_dim: int
    flags: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of K (and of V): [T, H_kv, D]."""
        return (self.num_tokens, self.num_heads, self.head_dim)

    @property
    def num_elements(self) -> int:
        """Elements of K alone (V has as many)."""
        return self.num_tokens * self.num_heads * self.head_dim


def check_dims(num_tokens: int, num_heads: int, head_dim: int) -> None:
    """Raises CodecError unless 1 <= T, H, D and all are within the format's limits."""
    limits = (
        (num_tokens, MAX_TOKENS, "T"),
        (num_heads, MAX_HEADS, "H"),
        (head_dim, MAX_HEAD_DIM, "D"),
    )
    for value, limit, name in limits:
        if not 1 <= value <= limit:
            raise CodecError(f"{name}={value} outside [1, {limit}]")
    if num_tokens * num_heads * head_dim > MAX_ELEMENTS:
        raise CodecError(f"T*H*D={num_tokens * num_heads * head_dim} exceeds {MAX_ELEMENTS}")


def pack(header: Header, body: Sequence[bytes]) -> bytes:
    """Header bytes followed by the body parts; the CRC-32 covers every other header field too."""
    fields = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        int(header.codec_id),
        DTYPE_CODES[header.dtype],
        header.flags,
        header.num_tokens,
        header.num_heads,
        header.head_dim,
        0,
    )[:_CRC_OFFSET]
    crc = crc32(fields)
    for part in body:
        crc = crc32(part, crc)
    return b"".join((fields, struct.pack("<I", crc), *body))


def peek_codec_id(payload: bytes | memoryview) -> CodecId:
    """The codec id of a payload after checking magic and version only (no CRC, no body)."""
    return _unpack(payload)[0]


def parse(payload: bytes | memoryview, codec_id: CodecId) -> Header:
    """Validates the header of `payload` for codec `codec_id` and returns it.

    Checks, in order, before anything is allocated: length, magic, version, codec id, dtype
    code, flags, dims within limits, the expansion bound, and the CRC-32.

    Raises:
        CodecError: any check fails.
    """
    found, fields = _unpack(payload)
    if found is not codec_id:
        raise CodecError(f"payload is {found.name.lower()}, not {codec_id.name.lower()}")
    dtype_code, flags, num_tokens, num_heads, head_dim, crc = fields
    if dtype_code not in _DTYPES:
        raise CodecError(f"unknown dtype code {dtype_code}")
    if flags != 0:
        raise CodecError(f"unknown flags {flags:#x} for format version {FORMAT_VERSION}")
    check_dims(num_tokens, num_heads, head_dim)
    header = Header(codec_id, _DTYPES[dtype_code], num_tokens, num_heads, head_dim, flags)
    if 2 * header.num_elements > MAX_EXPANSION * len(payload):
        raise CodecError(
            f"{len(payload)}-byte payload cannot hold 2x{header.num_elements} elements"
        )
    view = memoryview(payload)
    if crc32(view[HEADER_SIZE:], crc32(view[:_CRC_OFFSET])) != crc:
        raise CodecError("payload checksum mismatch (corrupt header or body, or truncated)")
    return header


def _unpack(payload: bytes | memoryview) -> tuple[CodecId, tuple[int, int, int, int, int, int]]:
    """Codec id and the remaining raw header fields, after length, magic and version checks."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise CodecError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) < HEADER_SIZE:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the header")
    magic, version, codec_code, *fields = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )
    try:
        codec_id = CodecId(codec_code)
    except ValueError:
        raise CodecError(f"unknown codec id {codec_code}") from None
    return codec_id, tuple(fields)


class BodyReader:
    """Reads typed arrays from a payload body, never past its end. Not thread-safe (one per decode).

    Every read checks the requested size against the bytes left before allocating.
    """

    def __init__(self, payload: bytes | memoryview) -> None:
        self._view = memoryview(payload)
        self._pos = HEADER_SIZE

    @property
    def num_bytes_left(self) -> int:
        return len(self._view) - self._pos

    def array(self, dtype: npt.DTypeLike, count: int, copy: bool = True) -> npt.NDArray[Any]:
        """The next `count` little-endian items of `dtype`, as a fresh writable array.

        With `copy` False, a view of the payload instead when the machine is little-endian and
        the items are aligned (read-only if the payload is; see `Codec.decode_owned`).

        Raises:
            CodecError: fewer than `count` items are left.
        """
        dt = np.dtype(dtype).newbyteorder("<")
        num_bytes = count * dt.itemsize
        if count < 0 or num_bytes > self.num_bytes_left:
            raise CodecError(
                f"payload truncated: need {num_bytes} bytes at offset {self._pos}, "
                f"{self.num_bytes_left} left"
            )
        out = np.frombuffer(self._view, dt, count, self._pos)
        self._pos += num_bytes
        if copy or not (out.dtype.isnative and out.flags.aligned):
            return out.astype(dt.newbyteorder("="))
        return out

    def scalar(self, dtype: npt.DTypeLike) -> int:
        """The next single integer of `dtype`."""
        return int(self.array(dtype, 1)[0])

    def finish(self) -> None:
        """Raises CodecError if bytes are left over (a length field disagrees with the data)."""
        if self.num_bytes_left:
            raise CodecError(f"{self.num_bytes_left} unexpected trailing bytes in payload")
