"""The one place where kvfuse errors become gRPC status codes."""

from __future__ import annotations

from typing import NoReturn

import grpc

from kvfuse.errors import (
    AuthError,
    CapacityError,
    CodecError,
    ConfigError,
    CorruptRecordError,
    InvalidRequestError,
    KvfuseError,
    PermissionDeniedError,
    ServiceUnavailableError,
    TierUnavailableError,
)

# First match wins, so subclasses come before their bases. InvalidObjectError is an
# InvalidRequestError; CorruptRecordError in a put means a record failed its CRC32 (DATA_LOSS).
_CODES: tuple[tuple[type[KvfuseError], grpc.StatusCode], ...] = (
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (CorruptRecordError, grpc.StatusCode.DATA_LOSS),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServiceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
)


def code_of(exc: KvfuseError) -> grpc.StatusCode:
    """The status code a kvfuse error is answered with (INTERNAL for anything unmapped)."""
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: KvfuseError) -> NoReturn:
    """Ends the RPC with the status of `exc` and its message; never returns."""
    context.abort(code_of(exc), str(exc))
    raise AssertionError("unreachable: context.abort raises")


def abort_not_found(context: grpc.ServicerContext, key: str) -> NoReturn:
    """Ends the RPC with NOT_FOUND: Pin or Move named a key that is not stored."""
    context.abort(grpc.StatusCode.NOT_FOUND, f"key {key} is not stored")
    raise AssertionError("unreachable: context.abort raises")
