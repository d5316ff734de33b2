"""What the blocking and the asyncio cache clients share: channel, stub, token, deadline, retry."""

from __future__ import annotations

from typing import ClassVar

from kvfuse.client.bulk import BulkRoute
from kvfuse.client.retry import RetryPolicy
from kvfuse.client.tls_check import TlsCheck
from kvfuse.client.wire import get_layers_method
from kvfuse.errors import KvfuseError
from kvfuse.service.auth import bearer_metadata
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.tls import Pem, client_ssl_context
from kvfuse.v1 import cache_pb2_grpc


class ClientBase:
    """The connection state of CacheClient (`aio` False) and AsyncCacheClient (`aio` True).

    The constructor opens the channel (see CacheClient for the arguments); the subclass
    makes the calls and closes it. Holds no other state, so the subclasses are thread-safe
    (the blocking one) or loop-bound (the asyncio one) exactly as their channels are. A call
    that ends UNAVAILABLE because of TLS (gRPC says "Socket closed") raises an error that
    names the TLS problem instead (`_explain`, see `tls_check`).
    """

    aio: ClassVar[bool] = False

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_root_cert: Pem = None,
        tls_client_cert: Pem = None,
        tls_client_key: Pem = None,
        tls_server_name: str | None = None,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 16 << 20,
        bulk: bool = True,
    ) -> None:
        self._channel = open_channel(
            target,
            max_message_bytes=max_message_bytes,
            tls_root_cert=tls_root_cert,
            tls_client_cert=tls_client_cert,
            tls_client_key=tls_client_key,
            tls_server_name=tls_server_name,
            aio=self.aio,
        )
        self._stub = cache_pb2_grpc.CacheServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._get_layers = get_layers_method(self._channel)  # responses stay bytes
        self._metadata = bearer_metadata(token)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        tls = client_ssl_context(tls_root_cert, tls_client_cert, tls_client_key)
        self._bulk = BulkRoute(
            target, bulk and not self.aio, token, tls, tls_server_name, timeout_s
        )
        probe_tls = client_ssl_context(tls_root_cert, tls_client_cert, tls_client_key)
        has_client_cert = tls_client_cert is not None
        self._tls_check = TlsCheck.for_target(
            target, probe_tls, has_client_cert, tls_server_name, timeout_s
        )

    def _explain(self, err: KvfuseError) -> KvfuseError:
        """The error a failed call raises: `err`, or the TLS refusal behind it (this probes
        the server: blocking, a few seconds at most, and only after a transport failure)."""
        return self._tls_check.explain(err)
