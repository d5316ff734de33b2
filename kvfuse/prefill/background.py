"""An iterator computed on a worker thread a bounded number of items ahead of its reader."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kvfuse.errors import ConfigError

T = TypeVar("T")


class BackgroundIterator(Generic[T]):
    """Runs `produce()` on a daemon thread while the reader consumes what it yielded.

    The producer runs at most `depth` items ahead, so it computes item i+1 while the reader
    handles (e.g. serializes and sends) item i. An exception in the producer is raised to the
    reader after the items before it. `cancel` (any thread, idempotent) ends the iteration at
    once, calls `on_cancel` (to wake a producer blocked on I/O) and closes the producer's
    iterator at its next item, which runs its cleanup on the producer thread. `start` starts
    the producer thread (e.g. `ThreadStarter.start`, to keep it at full priority).
    """

    def __init__(
        self,
        produce: Callable[[], Iterator[T]],
        depth: int,
        on_cancel: Callable[[], None] = lambda: None,
        name: str = "background",
        start: Callable[[threading.Thread], None] = threading.Thread.start,
    ) -> None:
        if depth < 1:
            raise ConfigError("depth must be >= 1")
        self._produce, self._depth, self._on_cancel = produce, depth, on_cancel
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._done = self._cancelled = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        start(self._thread)

    def __iter__(self) -> BackgroundIterator[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._done or self._cancelled)
            if self._items and not self._cancelled:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            if self._error is not None and not self._cancelled:
                error, self._error = self._error, None
                raise error
            raise StopIteration

    @property
    def finished(self) -> bool:
        """True once the producer returned or raised (its cleanup has run)."""
        return not self._thread.is_alive()

    def cancel(self) -> None:
        with self._cond:
            if self._cancelled:
                return
            self._cancelled = True
            self._cond.notify_all()
        self._on_cancel()

    def join(self, timeout_s: float | None = None) -> bool:
        """Waits for the producer thread to end; False on timeout."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _offer(self, item: T) -> bool:
        """Hands one item over, waiting for room; False once cancelled."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._items) < self._depth or self._cancelled)
            if self._cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _work(self) -> None:
        error: BaseException | None = None
        try:
            items = self._produce()
            try:
                for item in items:
                    if not self._offer(item):
                        break
            finally:
                close = getattr(items, "close", None)
                if close is not None:
                    close()  # a generator's cleanup runs here, on the producer thread
        except BaseException as exc:  # handed to the reader, who raises it
            error = exc
        with self._cond:
            self._error, self._done = error, True
            self._cond.notify_all()
