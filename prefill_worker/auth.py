"""Bearer-token auth on PrefillService calls (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

import grpc

SERVICE_PREFIX = "/kvfuse.v1.PrefillService/"
AUTH_HEADER = "authorization"


def bearer_ok(metadata: Any, token: str) -> bool:
    """True if `metadata` holds exactly one `authorization: Bearer <token>` with this token.

    Compared in constant time.
    """
    values = [v for k, v in metadata or () if k.lower() == AUTH_HEADER]
    if len(values) != 1:
        return False
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, offered = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(offered.strip().encode(), token.encode())


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Rejects PrefillService calls without the configured bearer token (UNAUTHENTICATED).

    Same scheme as the cache server. Immutable, thread-safe.
    """

    def __init__(self, token: str, on_deny: Callable[[], None] = lambda: None) -> None:
        self._token, self._on_deny = token, on_deny

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        if bearer_ok(details.invocation_metadata, self._token):
            return handler
        self._on_deny()
        return grpc.unary_stream_rpc_method_handler(
            _deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _deny(_request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
