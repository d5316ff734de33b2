"""The one place where kvfuse errors and the status codes of PrefillService and
ControllerService map to each other."""

from __future__ import annotations

from typing import NoReturn

import grpc

from kvfuse.errors import (
    AuthError,
    ConfigError,
    HandoffError,
    InvalidRequestError,
    KvfuseError,
    PromptTooLongError,
    ServiceUnavailableError,
)

# Server side: first match wins, so subclasses come before their bases.
_CODES: tuple[tuple[type[KvfuseError], grpc.StatusCode], ...] = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ServiceUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (HandoffError, grpc.StatusCode.FAILED_PRECONDITION),
)
# A PromptTooLongError travels as INVALID_ARGUMENT with this prefix so the client can rebuild it.
TOO_LONG_PREFIX = "prompt too long: "


def code_of(exc: KvfuseError) -> grpc.StatusCode:
    """The status code a kvfuse error is answered with (INTERNAL for anything unmapped)."""
    for error_type, code in _CODES:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def message_of(exc: KvfuseError) -> str:
    if isinstance(exc, PromptTooLongError):
        return f"{TOO_LONG_PREFIX}{exc.num_tokens} > {exc.max_tokens}: {exc}"
    return str(exc)


def abort(context: grpc.ServicerContext, exc: KvfuseError) -> NoReturn:
    """Ends the RPC with the status of `exc` and its message; never returns."""
    context.abort(code_of(exc), message_of(exc))
    raise AssertionError("unreachable: context.abort raises")


def error_from_rpc(exc: grpc.RpcError, service: str = "prefill worker") -> KvfuseError:
    """Client side: the kvfuse error for a failed call to `service` (the prefill worker or the
    controller, which map errors the same way)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        if details.startswith(TOO_LONG_PREFIX):
            counts = details[len(TOO_LONG_PREFIX) :].split(":", 1)[0].split(" > ")
            if len(counts) == 2 and all(c.isdigit() for c in counts):
                return PromptTooLongError(int(counts[0]), int(counts[1]))
        return InvalidRequestError(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return HandoffError(details)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return AuthError(details)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    ):
        return ServiceUnavailableError(f"{service}: {code.name}: {details}")
    return KvfuseError(f"{service} failed: {code.name}: {details}")
