"""Retry policy of the client SDK: exponential backoff with full jitter, for idempotent calls."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

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
