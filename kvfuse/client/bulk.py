"""Bulk reads: GetLayers over a cache server's plain (or TLS) socket instead of gRPC.

gRPC in Python moves a large layer record through HTTP/2 frames and several buffer copies on
each side; on a plain socket the record arrives with one `recv_into` straight into the buffer
its tensors then use. The protocol is in `protos/kvfuse/v1/cache.proto` (BulkRequest): length-
prefixed protobuf messages, each frame followed by its raw record bytes.

`BulkChannel` keeps idle connections for reuse, one request at a time on each. The framing
(`kvfuse.transport.bulk_socket`) is shared with the server side (`cache_server.bulk`).
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from kvfuse.client.wire import error_for_status
from kvfuse.codecs import decode_owned
from kvfuse.errors import (
    CacheError,
    CodecError,
    CorruptRecordError,
    KvfuseError,
    ServiceUnavailableError,
)
from kvfuse.kv import LayerFrame
from kvfuse.transport.bulk_socket import recv_exact, recv_message, send_message, status_code
from kvfuse.transport.protocol import MAX_RECORD_BYTES
from kvfuse.v1 import cache_pb2, common_pb2

_MAX_IDLE_CONNECTIONS = 8


class BulkUnavailable(ServiceUnavailableError):
    """The bulk port could not be used before anything was read: use gRPC instead."""


class BulkChannel:
    """Connections to one server's bulk port, reused one request at a time. Thread-safe.

    Args:
        host, port: where the bulk port listens.
        token: the bearer token sent with each request.
        tls: client TLS context (the server uses TLS on its bulk port exactly when it does on
            gRPC); None for plaintext.
        server_name: the name to check in the server certificate (default: host).
        timeout_s: deadline of one request's whole reply.
    """

    def __init__(
        self,
        host: str,
        port: int,
        token: str | None,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        timeout_s: float,
    ) -> None:
        self._address = (host, port)
        self._token = token or ""
        self._tls, self._server_name = tls, server_name or host
        self._timeout_s = timeout_s
        self._idle: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()

    def get_layers(
        self, request: cache_pb2.GetLayersRequest
    ) -> Iterator[tuple[str, bool] | LayerFrame]:
        """GetLayers' items: a (key, found) pair per key, then decoded LayerFrames in order.

        Raises:
            BulkUnavailable: nothing could be read (no connection, or it failed before the
                first reply): the caller may use gRPC instead.
            KvfuseError: the server's error status (mapped like gRPC's), a broken or
                malformed stream (ServiceUnavailableError, CacheError), a corrupt record
                (CorruptRecordError).
        """
        deadline = time.monotonic() + self._timeout_s
        message = cache_pb2.BulkRequest(token=self._token, get=request)
        sock, first = self._request(message, deadline)
        yield from self._replies(sock, first, deadline)

    def close(self) -> None:
        """Closes the idle connections (in-flight ones close when their request ends)."""
        while not self._idle.empty():
            self._idle.get_nowait().close()

    def _request(
        self, message: cache_pb2.BulkRequest, deadline: float
    ) -> tuple[socket.socket, cache_pb2.BulkReply]:
        """Sends `message` on a kept connection, or a new one when there is none or the kept
        one fails (the server closes idle ones); returns it with the first reply."""
        while True:
            try:
                sock, reused = self._idle.get_nowait(), True
            except queue.Empty:
                sock, reused = None, False
            try:
                sock = sock or self._open()
                return sock, self._first_reply(sock, message, deadline)
            except (OSError, ValueError) as exc:
                if sock is not None:
                    sock.close()
                if not reused:
                    raise BulkUnavailable(f"bulk port {self._address[1]}: {exc}") from exc

    def _open(self) -> socket.socket:
        sock = socket.create_connection(self._address, timeout=self._timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._tls is None:
            return sock
        return self._tls.wrap_socket(sock, server_hostname=self._server_name)

    def _first_reply(
        self, sock: socket.socket, message: cache_pb2.BulkRequest, deadline: float
    ) -> cache_pb2.BulkReply:
        sock.settimeout(max(deadline - time.monotonic(), 1e-3))
        send_message(sock, message)
        reply = recv_message(sock, cache_pb2.BulkReply)
        if reply is None:
            raise ConnectionError("the server closed the connection")
        return reply

    def _replies(
        self, sock: socket.socket, reply: cache_pb2.BulkReply, deadline: float
    ) -> Iterator[tuple[str, bool] | LayerFrame]:
        """Items until the status reply; the connection is kept only after a complete reply."""
        found: set[str] = set()
        frames_started = complete = False
        try:
            while True:
                kind = reply.WhichOneof("kind")
                if kind == "status":
                    complete = True
                    _raise_for_status(reply.status)
                    return
                if kind == "header" and not frames_started:
                    if reply.header.found:
                        found.add(reply.header.key)
                    yield reply.header.key, reply.header.found
                elif kind == "frame" and reply.frame.key in found:
                    frames_started = True
                    yield _read_frame(sock, reply.frame)
                else:
                    raise CacheError(f"bulk protocol error: unexpected {kind or 'empty'} reply")
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                next_reply = recv_message(sock, cache_pb2.BulkReply)
                if next_reply is None:
                    raise ConnectionError("the server closed the connection mid-reply")
                reply = next_reply
        except (OSError, ValueError) as exc:
            raise ServiceUnavailableError(f"bulk read failed: {exc}") from exc
        finally:
            if complete and self._idle.qsize() < _MAX_IDLE_CONNECTIONS:
                self._idle.put(sock)
            else:
                sock.close()


def _read_frame(sock: socket.socket, frame: common_pb2.LayerFrame) -> LayerFrame:
    """The record following `frame`, decoded into tensors that share its fresh buffer."""
    if frame.offset != 0 or frame.data or frame.record_nbytes > MAX_RECORD_BYTES:
        raise CacheError(f"bulk protocol error: bad frame for layer {frame.layer_idx}")
    record = recv_exact(sock, frame.record_nbytes)
    if record is None:
        raise ConnectionError("connection closed before a record")
    try:
        k, v = decode_owned(record)  # writable; the codec checks its CRC-32
    except CodecError as exc:
        raise CorruptRecordError(f"{frame.key}: layer {frame.layer_idx}: {exc}") from exc
    return LayerFrame(frame.key, frame.layer_idx, k, v)


def _raise_for_status(status: cache_pb2.BulkStatus) -> None:
    code = status_code(status.code)
    if code is not grpc.StatusCode.OK:
        raise error_for_status(code, status.message)


class BulkRoute:
    """Whether a client's GetLayers go over the server's bulk port: learnt from Stats on first
    use, forgotten for `retry_s` after the port failed (gRPC meanwhile). Thread-safe.

    Args:
        target: the gRPC "host:port"; the bulk port is on the same host.
        enabled: False always uses gRPC.
        token, tls, server_name, timeout_s: as for BulkChannel.
    """

    def __init__(
        self,
        target: str,
        enabled: bool,
        token: str | None,
        tls: ssl.SSLContext | None,
        server_name: str | None,
        timeout_s: float,
        retry_s: float = 30.0,
    ) -> None:
        host, sep, port = target.rpartition(":")
        self._host = host.strip("[]") if sep and port.isdigit() and "/" not in host else None
        self._enabled = enabled and self._host is not None
        self._token, self._tls, self._server_name = token, tls, server_name
        self._timeout_s, self._retry_s = timeout_s, retry_s
        self._lock = threading.Lock()
        self._channel: BulkChannel | None = None
        self._next_try_s = 0.0

    def channel(self, bulk_port: Callable[[], int]) -> BulkChannel | None:
        """The bulk channel, asking `bulk_port()` (a Stats call) when not known; None: gRPC."""
        if not self._enabled or self._host is None:
            return None
        with self._lock:
            if self._channel is not None or time.monotonic() < self._next_try_s:
                return self._channel
            self._next_try_s = time.monotonic() + self._retry_s
        try:
            port = bulk_port()
        except KvfuseError:
            return None  # the gRPC path will report the server's state
        with self._lock:
            if port and self._channel is None:
                self._channel = BulkChannel(
                    self._host, port, self._token, self._tls, self._server_name, self._timeout_s
                )
            return self._channel

    def forget(self, channel: BulkChannel) -> None:
        """Stops using `channel` (its port failed); Stats is asked again after retry_s."""
        with self._lock:
            if self._channel is channel:
                self._channel = None
                self._next_try_s = time.monotonic() + self._retry_s
        channel.close()

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
