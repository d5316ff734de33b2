"""LMCache's remote protocol (`lm://`, lmcache/v1/protocol.py of LMCache 0.5.6): headers and checks.

One TCP connection carries requests one after another. A request is a 186-byte header
(`iiiiiiiii150s`: command, length, memory format, dtype, location, shape[4], key padded with
spaces to 150 bytes); a PUT is followed by `length` payload bytes and gets no reply. GET, EXIST,
HEALTH (and LIST, which LMCache's own server never implemented) get a 36-byte reply header
(`iiiiiiiii`: code, length, memory format, dtype, shape[4], location), and a successful GET is
followed by `length` payload bytes. Codes are 200 (SUCCESS) and 400 (FAIL). A key is LMCache's
`CacheEngineKey` string, `model@world_size@worker_id@chunk_hash_hex@dtype[@tag%value...]`;
servers compare keys as strings. Byte order: LMCache packs in native order; every host it runs
on is little-endian, so this module says so explicitly.
"""

from __future__ import annotations

import math
import struct
from enum import IntEnum
from typing import NamedTuple

from kvfuse.errors import InvalidRequestError

MAX_KEY_LENGTH = 150
REQUEST = struct.Struct(f"<iiiiiiiii{MAX_KEY_LENGTH}s")  # ClientMetaMessage: 186 bytes
REPLY = struct.Struct("<iiiiiiiii")  # ServerMetaMessage: 36 bytes


class Command(IntEnum):
    """ClientCommand."""

    PUT = 1
    GET = 2
    EXIST = 3
    LIST = 4
    HEALTH = 5


class ReturnCode(IntEnum):
    """ServerReturnCode."""

    SUCCESS = 200
    FAIL = 400


class MemoryFormat(IntEnum):
    """lmcache.v1.memory_management.MemoryFormat (the values LMCache 0.5.6 defines)."""

    UNDEFINED = 0
    KV_2LTD = 1  # [2, num_layers, num_tokens, hidden_dim]
    KV_T2D = 2  # [num_tokens, 2, hidden_dim]
    KV_2TD = 3  # [2, num_tokens, hidden_dim]
    BINARY = 4  # compressed bytes: shape [length, 0, 0, 0]
    BINARY_BUFFER = 5
    KV_MLA_FMT = 6  # [1, num_layers, num_tokens, aligned_head_size]
    EC_TD = 7  # [num_tokens, hidden_dim]
    HS_TD = 8  # [num_tokens, hidden_dim]


# DTYPE_TO_INT's numbers → bytes per element (0: no dtype, as binary objects have).
DTYPE_ITEMSIZES = {0: 0, 1: 2, 2: 2, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 1}
FLOAT16 = 2  # DTYPE_TO_INT[torch.float16]
NUM_LOCATIONS = 3  # LOCATION_TO_INT: None, LocalCPUBackend, LocalDiskBackend
_COMMANDS = frozenset(int(c) for c in Command)
_FORMATS = frozenset(int(f) for f in MemoryFormat)
_UNSHAPED = (MemoryFormat.UNDEFINED, MemoryFormat.BINARY, MemoryFormat.BINARY_BUFFER)


class ObjectInfo(NamedTuple):
    """What a PUT header says about its payload and a GET reply repeats: LMCache's metadata.

    Shape: `shape` is the 4-d shape, padded with trailing zeros as LMCache sends it.
    """

    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]
    length: int


class Request(NamedTuple):
    """A parsed request header. `key` is the key string's UTF-8 bytes, padding stripped."""

    command: Command
    key: bytes
    info: ObjectInfo


# What lmcache_server answers to a miss, an EXIST and a HEALTH: no payload, KV_2LTD fp16.
EMPTY = ObjectInfo(MemoryFormat.KV_2LTD, FLOAT16, (0, 0, 0, 0), 0)


def pack_request(command: Command, key: bytes, info: ObjectInfo = EMPTY) -> bytes:
    """A request header (the key is padded with spaces, as LMCache's client does)."""
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidRequestError(f"key of {len(key)} bytes exceeds {MAX_KEY_LENGTH}")
    fields = (command, info.length, info.fmt, info.dtype, 0, *info.shape)
    return REQUEST.pack(*fields, key.ljust(MAX_KEY_LENGTH))


def pack_reply(code: ReturnCode, info: ObjectInfo = EMPTY) -> bytes:
    return REPLY.pack(code, info.length, info.fmt, info.dtype, *info.shape, 0)


def unpack_reply(data: bytes | bytearray | memoryview) -> tuple[int, ObjectInfo]:
    """(code, what the reply says about the payload) of a 36-byte reply header."""
    code, length, fmt, dtype, *shape, _location = REPLY.unpack(data)
    return code, ObjectInfo(fmt, dtype, (shape[0], shape[1], shape[2], shape[3]), length)


def parse_request(data: bytes | bytearray | memoryview, max_length: int) -> Request:
    """The request in a 186-byte header, validated before anything is allocated for it.

    Raises:
        InvalidRequestError: unknown command; a key that is not UTF-8 or (except for HEALTH and
            LIST) empty; for PUT, a length outside [0, `max_length`], an unknown memory format,
            dtype or location, a negative dimension, or a shape whose elements need more bytes
            than the payload has.
    """
    command, length, fmt, dtype, location, *dims, raw_key = REQUEST.unpack(data)
    if command not in _COMMANDS:
        raise InvalidRequestError(f"unknown LMCache command {command}")
    key = _key(raw_key, Command(command))
    shape = (dims[0], dims[1], dims[2], dims[3])
    info = ObjectInfo(fmt, dtype, shape, length)
    if command == Command.PUT:
        check_object(info, location, max_length)
    return Request(Command(command), key, info)


def _key(raw: bytes, command: Command) -> bytes:
    try:
        key = raw.rstrip(b"\0").decode("utf-8").strip()  # LMCache strips the space padding
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"LMCache key is not UTF-8: {exc}") from exc
    if not key and command not in (Command.HEALTH, Command.LIST):
        raise InvalidRequestError("empty LMCache key")
    return key.encode()


def check_object(info: ObjectInfo, location: int, max_length: int) -> None:
    """Raises InvalidRequestError unless a PUT header describes a payload that may be stored."""
    if not 0 <= info.length <= max_length:
        raise InvalidRequestError(
            f"LMCache PUT of {info.length} bytes: the limit is {max_length} (max_object_bytes)"
        )
    if info.fmt not in _FORMATS:
        raise InvalidRequestError(f"unknown LMCache memory format {info.fmt}")
    if info.dtype not in DTYPE_ITEMSIZES:
        raise InvalidRequestError(f"unknown LMCache dtype {info.dtype}")
    if not 0 <= location < NUM_LOCATIONS:
        raise InvalidRequestError(f"unknown LMCache location {location}")
    if any(d < 0 for d in info.shape):
        raise InvalidRequestError(f"negative dimension in LMCache shape {list(info.shape)}")
    itemsize = DTYPE_ITEMSIZES[info.dtype]
    if info.fmt in _UNSHAPED or itemsize == 0:
        return  # compressed or untyped bytes: the shape does not size the payload
    dims = list(info.shape)
    while len(dims) > 1 and dims[-1] == 0:  # LMCache's padding of shapes below 4-d
        dims.pop()
    if math.prod(dims) * itemsize > info.length:
        raise InvalidRequestError(
            f"LMCache shape {dims} of {itemsize}-byte elements needs "
            f"{math.prod(dims) * itemsize} bytes, the payload has {info.length}"
        )
