"""Bulk-port message framing: length-prefixed protobuf messages and raw bytes over a socket.

The protocol is in `protos/kvfuse/v1/cache.proto` (BulkRequest): each message is a
little-endian uint32 length and the serialized message; a frame message is followed by its
raw record bytes; a status reply (a gRPC status code by number) ends each request.
"""

from __future__ import annotations

import socket
import struct
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from kvfuse.v1 import cache_pb2

MAX_MESSAGE_BYTES = 1 << 20  # one BulkRequest/BulkReply (a header holds per-layer metadata)
_LENGTH = struct.Struct("<I")
M = TypeVar("M", bound=Message)


def send_message(sock: socket.socket, message: Message) -> None:
    data = message.SerializeToString()
    sock.sendall(_LENGTH.pack(len(data)) + data)


def recv_exact(sock: socket.socket, num_bytes: int) -> memoryview | None:
    """Exactly `num_bytes` into a fresh writable buffer (not zero-filled first: every byte is
    received into it); None at a clean end of stream before any byte.

    Raises:
        ConnectionError: the stream ended part-way.
    """
    view = memoryview(np.empty(num_bytes, np.uint8).data).cast("B")
    got = 0
    while got < num_bytes:
        n = sock.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ConnectionError(f"connection closed after {got} of {num_bytes} bytes")
        got += n
    return view


def recv_message(sock: socket.socket, message_type: type[M]) -> M | None:
    """The next length-prefixed message; None at a clean end of stream.

    Raises:
        ConnectionError: the stream ended part-way.
        ValueError: the length exceeds MAX_MESSAGE_BYTES or the bytes do not parse.
    """
    head = recv_exact(sock, _LENGTH.size)
    if head is None:
        return None
    (num_bytes,) = _LENGTH.unpack(head)
    if num_bytes > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {num_bytes} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = recv_exact(sock, num_bytes) if num_bytes else memoryview(b"")
    if body is None:
        raise ConnectionError("connection closed inside a message")
    try:
        return message_type.FromString(body.tobytes())
    except DecodeError as exc:
        raise ValueError(f"malformed {message_type.__name__}: {exc}") from exc


def status_reply(code: grpc.StatusCode, message: str) -> cache_pb2.BulkReply:
    """The reply that ends a request with status `code` (sent as its number) and `message`."""
    return cache_pb2.BulkReply(status=cache_pb2.BulkStatus(code=code.value[0], message=message))


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status code with this number (UNKNOWN for any other number)."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
