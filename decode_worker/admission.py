"""Admission of requests to an engine that batches on its own (vLLM): a batch-size and KV bound,
the rest waiting in arrival order.

The embedded `Scheduler` admits a sequence when a batch slot and KV room are free; the vLLM
engine admits the same way before it sends a request on, so `max_batch`, `kv_cache_bytes` and
`max_waiting` bound what one decode worker puts on its vLLM, and the `vllm:num_requests_*` and
KV gauges read the same numbers for both engines.
"""

from __future__ import annotations

import asyncio
from collections import deque

from decode_worker.kv_budget import KVBudget
from kvfuse.errors import PromptTooLongError, ServiceUnavailableError


class Admission:
    """Requests running (at most `max_batch`, their KV within `kv_budget_tokens`) and waiting
    (at most `max_waiting`), admitted first come, first served. Event-loop only: no method may
    be called from another thread.

    Lifecycle of a request: `enter` (may refuse; await the future it returns), then `leave`.
    """

    def __init__(self, max_batch: int, kv_budget_tokens: int, max_waiting: int) -> None:
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._budget = KVBudget(kv_budget_tokens)
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.num_running = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        return self._budget.usage

    def enter(self, num_kv_tokens: int) -> asyncio.Future[None]:
        """Queues a request; the future is done once it runs (a batch slot and its KV taken).

        Raises:
            PromptTooLongError: it needs more KV than the whole budget.
            ServiceUnavailableError: it would wait, and `max_waiting` requests wait already.
        """
        if num_kv_tokens > self._budget.num_tokens:
            raise PromptTooLongError(num_kv_tokens, self._budget.num_tokens)
        admitted = asyncio.get_running_loop().create_future()
        if not self._waiting and self._fits(num_kv_tokens):
            self._take(num_kv_tokens)
            admitted.set_result(None)
        elif len(self._waiting) >= self.max_waiting:
            raise ServiceUnavailableError(f"server at capacity: {len(self._waiting)} waiting")
        else:
            self._waiting.append((num_kv_tokens, admitted))
        return admitted

    def leave(self, num_kv_tokens: int, admitted: asyncio.Future[None]) -> None:
        """The request is done (or gone): gives back its slot and KV if it ran, its place in
        the queue otherwise, and admits who waits next. Once per `enter`."""
        if admitted.done() and not admitted.cancelled():
            self.num_running -= 1
            self._budget.free(num_kv_tokens)
        else:
            admitted.cancel()
            self._waiting = deque(e for e in self._waiting if e[1] is not admitted)
        self._admit()

    def _fits(self, num_kv_tokens: int) -> bool:
        return self.num_running < self.max_batch and self._budget.can_allocate(num_kv_tokens)

    def _take(self, num_kv_tokens: int) -> None:
        self.num_running += 1
        self._budget.allocate(num_kv_tokens)

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            num_kv_tokens, admitted = self._waiting.popleft()
            if admitted.done():  # cancelled while waiting: holds nothing
                continue
            self._take(num_kv_tokens)
            admitted.set_result(None)
