"""What the blocking and the asyncio cache clients share: channel, stub, token, deadline, retry."""

from __future__ import annotations

from typing import ClassVar

from kvfuse.client.bulk import BulkRoute
from kvfuse.client.retry import RetryPolicy
from kvfuse.client.wire import get_layers_method
from kvfuse.service.auth import bearer_metadata
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.tls import Pem, client_ssl_context
from kvfuse.v1 import cache_pb2_grpc


class ClientBase:
    """The connection state of CacheClient (`aio` False) and AsyncCacheClient (`aio` True).

    The constructor opens the channel (see CacheClient for the arguments); the subclass
    makes the calls and closes it. Holds no other state, so the subclasses are thread-safe
    (the blocking one) or loop-bound (the asyncio one) exactly as their channels are.
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
        tls = (
            None if self.aio else client_ssl_context(tls_root_cert, tls_client_cert, tls_client_key)
        )
        self._bulk = BulkRoute(
            target, bulk and not self.aio, token, tls, tls_server_name, timeout_s
        )
