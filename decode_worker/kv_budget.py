"""The token budget of all sequences' KV caches: admission waits until a sequence fits."""

from __future__ import annotations


class KVBudget:
    """Tokens of KV cache the running sequences may hold. Not thread-safe (caller locks)."""

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.num_used_tokens = 0

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_used_tokens + num_tokens <= self.num_tokens

    def allocate(self, num_tokens: int) -> None:
        self.num_used_tokens += num_tokens

    def free(self, num_tokens: int) -> None:
        self.num_used_tokens -= num_tokens

    @property
    def usage(self) -> float:
        """Fraction in use, 0..1."""
        return self.num_used_tokens / self.num_tokens
