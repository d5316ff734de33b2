"""Every kvfuse error maps to its gRPC status code in one table."""

from __future__ import annotations

import grpc
import pytest

from cache_server.status import code_of
from kvfuse.errors import (
    AuthError,
    CacheError,
    CapacityError,
    CodecError,
    CorruptRecordError,
    InvalidObjectError,
    InvalidRequestError,
    KvfuseError,
    ServiceUnavailableError,
    TierUnavailableError,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidObjectError, grpc.StatusCode.INVALID_ARGUMENT),
        (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
        (CodecError, grpc.StatusCode.INVALID_ARGUMENT),
        (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (AuthError, grpc.StatusCode.UNAUTHENTICATED),
        (TierUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (ServiceUnavailableError, grpc.StatusCode.UNAVAILABLE),
        (CorruptRecordError, grpc.StatusCode.DATA_LOSS),
        (CacheError, grpc.StatusCode.INTERNAL),
        (KvfuseError, grpc.StatusCode.INTERNAL),
    ],
)
def test_code_of(error: type[KvfuseError], code: grpc.StatusCode) -> None:
    assert code_of(error("x")) is code
