"""Retry policy of the client SDK: exponential backoff with full jitter, for idempotent calls."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from kvfuse.client.wire import RETRYABLE_CODES, error_from_rpc
from kvfuse.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is retried on UNAVAILABLE or DEADLINE_EXCEEDED.

    Attributes:
        max_attempts: tries in total (1 = no retry).
        backoff_s: the first delay's upper bound; each further one doubles it.
        max_backoff_s: cap on any single delay.
    """

    max_attempts: int = 3
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ConfigError("retry policy needs max_attempts >= 1 and non-negative delays")

    def delays(self) -> Iterator[float]:
        """The delay before each retry (max_attempts - 1 of them), with full jitter."""
        for attempt in range(self.max_attempts - 1):
            yield random.uniform(0.0, min(self.max_backoff_s, self.backoff_s * 2**attempt))


def retry_delay(delays: Iterator[float], exc: grpc.RpcError, retryable: bool = True) -> float:
    """Seconds to wait before retrying the call that failed with `exc`.

    Takes the next of the call's `delays` (from `RetryPolicy.delays`) when the code is
    UNAVAILABLE or DEADLINE_EXCEEDED and `retryable` holds (e.g. no stream message arrived
    yet); otherwise, or when none is left, raises the kvfuse error of `exc`.
    """
    delay = next(delays, None) if retryable and exc.code() in RETRYABLE_CODES else None
    if delay is None:
        raise error_from_rpc(exc) from exc
    return delay
