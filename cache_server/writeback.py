"""A background worker that runs one task whenever it is woken (the store's write-back)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Background:
    """Runs `task` on a daemon thread after each `notify` (wake-ups while it runs collapse
    into one more run), until `close`. An exception in `task` is logged and the thread goes
    on: housekeeping must never take the server down."""

    def __init__(self, name: str, task: Callable[[], object]) -> None:
        self._task = task
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops the thread after the run in progress (waits up to `timeout_s` for it)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            try:
                self._task()
            except Exception:
                log.exception("%s failed; it runs again at the next wake-up", self._thread.name)
