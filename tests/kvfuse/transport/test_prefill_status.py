"""Prefill status codes: kvfuse errors to gRPC codes on the worker and back on the client."""

from __future__ import annotations

import grpc
import pytest

from kvfuse.errors import (
    AuthError,
    InvalidRequestError,
    KvfuseError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from kvfuse.transport import prefill_status as status


class _RpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("error", "code", "client_type"),
    [
        (PromptTooLongError(9000, 8192), grpc.StatusCode.INVALID_ARGUMENT, PromptTooLongError),
        (InvalidRequestError("bad"), grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
        (AuthError("no"), grpc.StatusCode.UNAUTHENTICATED, AuthError),
        (ServiceUnavailableError("x"), grpc.StatusCode.UNAVAILABLE, ServiceUnavailableError),
        (KvfuseError("x"), grpc.StatusCode.INTERNAL, KvfuseError),
    ],
)
def test_errors_map_to_codes_and_back(
    error: KvfuseError, code: grpc.StatusCode, client_type: type[KvfuseError]
) -> None:
    assert status.code_of(error) == code
    back = status.error_from_rpc(_RpcError(code, status.message_of(error)))
    assert type(back) is client_type
    if isinstance(error, PromptTooLongError):
        assert isinstance(back, PromptTooLongError)
        assert (back.num_tokens, back.max_tokens) == (9000, 8192)


def test_deadline_is_service_unavailable() -> None:
    err = status.error_from_rpc(_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "slow"))
    assert isinstance(err, ServiceUnavailableError) and "DEADLINE_EXCEEDED" in str(err)
