"""The bulk port: GetLayers over plain (or TLS) sockets, records sent straight from the store.

Protocol in `protos/kvfuse/v1/cache.proto` (BulkRequest). Each connection has its own thread
and serves requests one after another: authenticate the token, validate and read the objects
exactly as the gRPC GetLayers does (`download`), send headers, then each layer record as a
frame message followed by the record's bytes (`sendall` of the stored buffer: no copy in
Python), then a status. Errors become a status reply with the gRPC code `status` assigns;
a malformed or oversized request also closes the connection. Nothing a client sends can stop
the server: at most `max_connections` connections are served, the rest are refused.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

import grpc

from cache_server import status
from cache_server.download import iter_frames, open_download
from cache_server.listener import SocketListener
from cache_server.metrics import CacheMetrics
from cache_server.records import RecordCodec
from cache_server.store import TieredStore
from kvfuse.errors import KvfuseError
from kvfuse.service.auth import Authenticator, bearer_metadata
from kvfuse.transport.bulk_socket import recv_message, send_message, status_reply
from kvfuse.v1 import cache_pb2

log = logging.getLogger(__name__)
OP = "GetLayersBulk"  # the op label of its metrics


class BulkServer(SocketListener):
    """Serves GetLayers on the bulk port (a `SocketListener`: binds on construction, `start`,
    `stop`). Thread-safe.

    Args:
        host, port: listen address (port 0 picks a free one).
        store, codecs, max_batch_keys: what GetLayers reads and how (shared with gRPC).
        auth: resolves the token of each request to its tenant.
        metrics: request durations/codes and bytes sent, as for gRPC ops.
        tls: server TLS context (the gRPC port's certificate); None for plaintext.
        max_connections: connections served at once; more are closed at accept.
        idle_timeout_s: a connection with no request for this long is closed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        store: TieredStore,
        codecs: RecordCodec,
        max_batch_keys: int,
        auth: Authenticator,
        metrics: CacheMetrics,
        tls: ssl.SSLContext | None,
        max_connections: int,
        idle_timeout_s: float = 300.0,
    ) -> None:
        super().__init__("bulk port", host, port, max_connections)
        self._store, self._codecs, self._max_batch_keys = store, codecs, max_batch_keys
        self._auth, self._metrics, self._tls = auth, metrics, tls
        self._idle_timeout_s = idle_timeout_s

    def serve(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self._idle_timeout_s)
        if self._tls is not None:
            conn = self._tls.wrap_socket(conn, server_side=True)
        while self._serve_one(conn):
            pass

    def _serve_one(self, conn: socket.socket) -> bool:
        """Answers one request; False when the connection should close."""
        try:
            request = recv_message(conn, cache_pb2.BulkRequest)
        except ValueError as exc:  # malformed or oversized: answer, then close
            send_message(conn, status_reply(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
            return False
        if request is None:
            return False
        start, code, message = time.perf_counter(), grpc.StatusCode.OK, ""
        try:
            self._send_layers(conn, request)
        except KvfuseError as exc:
            code, message = status.code_of(exc), str(exc)
        except OSError:
            code = grpc.StatusCode.CANCELLED  # the client went away
            raise
        finally:
            self._metrics.observe_request(OP, code.name, time.perf_counter() - start)
        send_message(conn, status_reply(code, message))
        return True

    def _send_layers(self, conn: socket.socket, request: cache_pb2.BulkRequest) -> None:
        tenant = self._auth.tenant_of(bearer_metadata(request.token or None))
        download = open_download(
            self._store, tenant, request.get, self._max_batch_keys, self._codecs
        )
        for header in download.headers:
            send_message(conn, cache_pb2.BulkReply(header=header))
        sent_bytes = self._metrics.sent_bytes.labels(OP)
        for frame in iter_frames(download, self._codecs, max_frame_bytes=None):
            reply = cache_pb2.BulkReply()
            reply.frame.key, reply.frame.layer_idx = frame.key, frame.layer_idx
            reply.frame.record_nbytes = frame.record_nbytes
            reply.frame.record_crc32 = frame.record_crc32
            send_message(conn, reply)
            conn.sendall(frame.data)
            sent_bytes.inc(len(frame.data))
