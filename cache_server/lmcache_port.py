"""The LMCache port: LMCache's remote protocol (`lm://host:port`) served from the TieredStore.

A drop-in for LMCache's `lmcache_server`: LMCache-enabled vLLM pods whose `remote_url` points
here put, check and get their KV chunks as they would there (protocol in
`kvfuse.transport.lmcache_wire`), but the objects live in kvfuse's tiers, in their own key
space (`cache_server.lmcache_objects`), with the tiers' budgets, eviction, demotion to disk and
metrics. The protocol has no authentication: whoever reaches the port reads and writes every
LMCache object (never a tenant's chunks), so it listens on 127.0.0.1 unless told otherwise.

Each connection has its own thread and serves requests in order. A PUT reserves its size in the
server's upload budget before reading its payload; when the budget is full the payload is read
and dropped (a PUT has no reply: the client learns it from a later EXIST), so the stream stays
in step. A header that does not parse (unknown command, bad key, negative or oversized length,
impossible shape) gets a FAIL reply and the connection is closed; so does a peer that stalls
mid-request for `io_timeout_s`, or whose PUT payload takes longer than that in all. An idle
connection is kept for good (LMCache's client opens one
at start and never reconnects), at most `max_connections` at once.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from enum import StrEnum

from cache_server.budget import UploadBudget
from cache_server.listener import SocketListener
from cache_server.lmcache_objects import RECORD_HEAD, from_stored, storage_key, to_stored
from cache_server.metrics import CacheMetrics
from cache_server.store import TieredStore
from cache_server.tiers.base import MappedObject
from kvfuse.errors import (
    CapacityError,
    InvalidObjectError,
    InvalidRequestError,
    TierUnavailableError,
)
from kvfuse.transport.lmcache_wire import (
    REQUEST,
    Command,
    Request,
    ReturnCode,
    pack_reply,
    parse_request,
)

log = logging.getLogger(__name__)
IO_TIMEOUT_S = 60.0
_DISCARD_BYTES = 1 << 20
_COMMANDS = {c.value: c.name.lower() for c in Command}  # the metrics' command label


class Outcome(StrEnum):
    """What became of a request: the `code` label of its metrics."""

    SUCCESS = "SUCCESS"  # answered SUCCESS; a PUT: stored
    FAIL = "FAIL"  # answered FAIL (a miss); a PUT: no tier kept it (admission, no room below)
    INVALID = "INVALID"  # the header did not parse: FAIL, then the connection was closed
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # a PUT over the upload budget, or no tier had room
    UNAVAILABLE = "UNAVAILABLE"  # a PUT no tier was reachable for


Handler = Callable[[socket.socket, Request], Outcome]
_TIMEVAL = struct.Struct("@ll")  # struct timeval of SO_RCVTIMEO / SO_SNDTIMEO (Linux)
_NO_TIMEOUT = _TIMEVAL.pack(0, 0)


class LMCachePort(SocketListener):
    """Listens for LMCache clients and serves each connection on its own daemon thread.

    Lifecycle: construct (binds; `port` is then the bound port), `start`, `stop` (closes the
    listener and every connection). Thread-safe.

    Args:
        host, port: listen address (port 0 picks a free one).
        store: where objects live; uploads: the budget a PUT reserves its size in.
        metrics: requests by command and result, bytes received and sent.
        max_object_bytes: the largest payload a PUT may announce.
        max_connections: connections served at once; more are closed at accept.
        io_timeout_s: how long a request may stall part-way, and a PUT's payload take in all
            (between requests: no limit).
    """

    def __init__(
        self,
        host: str,
        port: int,
        store: TieredStore,
        uploads: UploadBudget,
        metrics: CacheMetrics,
        max_object_bytes: int,
        max_connections: int,
        io_timeout_s: float = IO_TIMEOUT_S,
    ) -> None:
        super().__init__("LMCache port", host, port, max_connections)
        self._store, self._uploads, self._metrics = store, uploads, metrics
        self._max_object_bytes, self._io_timeout_s = max_object_bytes, io_timeout_s
        seconds = int(io_timeout_s)
        self._io_timeval = _TIMEVAL.pack(seconds, int((io_timeout_s - seconds) * 1e6))
        self._handlers: dict[Command, Handler] = {
            Command.PUT: self._put, Command.GET: self._get, Command.EXIST: self._exist,
            Command.LIST: self._list, Command.HEALTH: self._health,
        }  # fmt: skip

    def serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # finds vanished peers
        # Blocking, with the kernel's timeouts rather than Python's: one send() or
        # recv(MSG_WAITALL) moves a whole payload, where a socket with a Python timeout
        # polls and wakes for every buffer's worth (GETs were ~5% slower that way).
        conn.settimeout(None)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._io_timeval)
        head = bytearray(REQUEST.size)
        while self._serve_one(conn, head):
            pass

    def _serve_one(self, conn: socket.socket, head: bytearray) -> bool:
        """Answers one request; False when the connection should close."""
        if not self._recv_header(conn, head):
            return False
        start = time.perf_counter()
        try:
            request = parse_request(head, self._max_object_bytes)
        except InvalidRequestError as exc:
            log.warning("LMCache port: closing a connection after a bad request: %s", exc)
            command = _COMMANDS.get(int.from_bytes(head[:4], "little", signed=True), "unknown")
            self._metrics.observe_lmcache(command, Outcome.INVALID, time.perf_counter() - start)
            conn.sendall(pack_reply(ReturnCode.FAIL))
            return False
        code = self._handlers[request.command](conn, request)
        self._metrics.observe_lmcache(_COMMANDS[request.command], code, time.perf_counter() - start)
        return True

    def _recv_header(self, conn: socket.socket, head: bytearray) -> bool:
        """Reads the next request header into `head`; False at a clean end of stream."""
        view = memoryview(head)
        # between requests: no limit (an LMCache client may idle for hours)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _NO_TIMEOUT)
        got = conn.recv_into(view)
        if got == 0:
            return False
        # within a request: a peer that stalls for io_timeout_s is dropped
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, self._io_timeval)
        _recv_exact(conn, view[got:])
        return True

    def _put(self, conn: socket.socket, request: Request) -> Outcome:
        length = request.info.length
        try:
            reservation = self._uploads.reserve(
                RECORD_HEAD.size + length, f"LMCache PUT of {length} bytes"
            )
        except CapacityError as exc:
            log.debug("LMCache port: dropping a PUT: %s", exc)  # counted in the metrics
            _discard(conn, length)
            return Outcome.RESOURCE_EXHAUSTED
        with reservation:  # a trickle of bytes must not hold it for long: one deadline
            payload = _receive_payload(conn, length, time.monotonic() + self._io_timeout_s)
            reservation.received_total(RECORD_HEAD.size + length)
            self._metrics.received_bytes.labels("LMCachePut").inc(length)
            try:
                placement = self._store.put(to_stored(request.key, request.info, payload))
            except CapacityError:
                return Outcome.RESOURCE_EXHAUSTED
            except TierUnavailableError:
                return Outcome.UNAVAILABLE
        return Outcome.SUCCESS if placement.stored else Outcome.FAIL

    def _get(self, conn: socket.socket, request: Request) -> Outcome:
        found = self._store.get_or_map(storage_key(request.key))
        if found is None:
            conn.sendall(pack_reply(ReturnCode.FAIL))
            return Outcome.FAIL
        with found if isinstance(found, MappedObject) else contextlib.nullcontext():
            try:
                info, payload = from_stored(found)
            except InvalidObjectError as exc:  # not written by this port: never expected
                log.error("LMCache port: %s", exc)
                conn.sendall(pack_reply(ReturnCode.FAIL))
                return Outcome.FAIL
            conn.sendall(pack_reply(ReturnCode.SUCCESS, info))
            conn.sendall(payload)  # the stored bytes or the file's pages: no copy
        self._metrics.sent_bytes.labels("LMCacheGet").inc(info.length)
        return Outcome.SUCCESS

    def _exist(self, conn: socket.socket, request: Request) -> Outcome:
        found = self._store.lookup(storage_key(request.key)) is not None
        conn.sendall(pack_reply(ReturnCode.SUCCESS if found else ReturnCode.FAIL))
        return Outcome.SUCCESS if found else Outcome.FAIL

    def _list(self, conn: socket.socket, request: Request) -> Outcome:
        conn.sendall(pack_reply(ReturnCode.FAIL))  # LMCache's own server never implemented it
        return Outcome.FAIL

    def _health(self, conn: socket.socket, request: Request) -> Outcome:
        conn.sendall(pack_reply(ReturnCode.SUCCESS))
        return Outcome.SUCCESS


def _receive_payload(conn: socket.socket, length: int, deadline: float) -> bytes:
    """A PUT's `length` payload bytes from `conn`, by `deadline` (time.monotonic()).

    One recv(MSG_WAITALL) fills a new bytes object, which the tiers then keep as it is (no
    copy). It comes back short only when the peer stalls past the socket's timeout or goes
    away: then the rest is gathered piecewise, with one more copy, off the fast path.
    """
    first = conn.recv(length, socket.MSG_WAITALL)
    if len(first) == length:
        return first
    if not first:
        raise ConnectionError(f"connection closed before a {length}-byte payload")
    buffer = bytearray(length)
    buffer[: len(first)] = first
    _recv_exact(conn, memoryview(buffer)[len(first) :], deadline)
    return bytes(buffer)


def _recv_exact(conn: socket.socket, view: memoryview, deadline: float | None = None) -> None:
    """Fills `view` from `conn`. Raises ConnectionError if the stream ends first, TimeoutError
    if `deadline` (time.monotonic()) passes first."""
    got, size = 0, len(view)
    while got < size:
        num = conn.recv_into(view[got:], 0, socket.MSG_WAITALL)  # short only on timeout or EOF
        if num == 0:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        got += num
        if deadline is not None and got < size and time.monotonic() > deadline:
            raise TimeoutError(f"{got} of {size} bytes arrived in the time allowed")


def _discard(conn: socket.socket, num_bytes: int) -> None:
    """Reads and drops `num_bytes` in bounded pieces (a refused PUT's payload)."""
    scratch = memoryview(bytearray(min(num_bytes, _DISCARD_BYTES)))
    while num_bytes > 0:
        num = conn.recv_into(scratch[: min(num_bytes, len(scratch))])
        if num == 0:
            raise ConnectionError("connection closed inside a refused PUT")
        num_bytes -= num
