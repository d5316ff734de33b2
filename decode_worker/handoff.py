"""A hand-off prefill read on a thread for the event loop: the prefill worker's address, then
the prefill's result, each awaited on its own.

`PrefillClient.hand_off` is a blocking gRPC stream that yields the worker's address at once
(the fused KV will wait there under the hand-off id) and the `PrefillResult` when the prefill
is done. The vLLM engine sends vLLM the address as soon as it has it and collects the result
later, so the read runs on a pool thread and hands both over to the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from typing import TypeVar

from kvfuse.errors import ServiceUnavailableError
from kvfuse.prefill import Cancel, PrefillRequest, PrefillResult
from kvfuse.service.threads import io_thread

log = logging.getLogger(__name__)
T = TypeVar("T")
# `PrefillClient.hand_off` (or one guarded by a health check): address first, then the result.
HandOff = Callable[[PrefillRequest, Cancel | None], Iterator[str | PrefillResult]]


class HandoffCall:
    """One hand-off prefill, started at construction on a thread of `pool`.

    `address` and `result` are awaited on the loop that constructed it; `cancel` may be
    called from any thread and cancels the gRPC call (the worker stops computing and drops
    the hand-off). Outcomes are kept as values, so one nobody awaits (an aborted request's
    result) is never reported as an unretrieved exception.
    """

    def __init__(self, hand_off: HandOff, request: PrefillRequest, pool: Executor) -> None:
        self.request = request
        self._cancel = Cancel()
        self._loop = asyncio.get_running_loop()
        self._address: asyncio.Future[str | BaseException] = self._loop.create_future()
        self._result: asyncio.Future[PrefillResult | BaseException] = self._loop.create_future()
        pool.submit(self._read, hand_off)

    @property
    def handoff_id(self) -> str:
        return self.request.handoff_id

    async def address(self, timeout_s: float) -> str:
        """The worker's address for the taker.

        Raises:
            KvfuseError: the call failed before it sent one (worker down, refused).
            TimeoutError: none within `timeout_s`.
        """
        return _unwrap(await asyncio.wait_for(asyncio.shield(self._address), timeout_s))

    async def result(self, timeout_s: float) -> PrefillResult:
        """The prefill's first token and stats.

        Raises:
            KvfuseError: the prefill failed or was cancelled.
            TimeoutError: not within `timeout_s`.
        """
        return _unwrap(await asyncio.wait_for(asyncio.shield(self._result), timeout_s))

    def result_now(self) -> PrefillResult | None:
        """The result if it has arrived (None otherwise, or if the prefill failed)."""
        if not self._result.done():
            return None
        value = self._result.result()
        return None if isinstance(value, BaseException) else value

    def cancel(self) -> None:
        self._cancel.cancel()

    def _read(self, hand_off: HandOff) -> None:
        """A pool thread: reads the stream to its end, handing each item to the loop."""
        io_thread()  # only moves bytes (kvfuse/service/threads.py)
        try:
            for item in hand_off(self.request, self._cancel):
                if isinstance(item, str):
                    self._settle(self._address, item)
                else:
                    self._settle(self._result, item)
            error: BaseException = ServiceUnavailableError("the hand-off ended without a result")
        except Exception as exc:  # reported to whoever awaits; logged by the engine
            error = exc
        self._settle(self._address, error)  # no-op for an outcome already settled
        self._settle(self._result, error)

    def _settle(self, future: asyncio.Future[T], value: T) -> None:
        def settle() -> None:
            if not future.done():
                future.set_result(value)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: the server is going down
            log.debug("hand-off %s settled after the event loop closed", self.handoff_id)


def _unwrap(value: T | BaseException) -> T:
    if isinstance(value, BaseException):
        raise value
    return value
