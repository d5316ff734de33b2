"""Keeps a set of server child processes running: a child that exits is restarted, after a
delay that doubles while it keeps failing and starts over once it has stayed up a while."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvfuse.procs import ServerProcess


@dataclass
class _Backoff:
    """When one child may be restarted next."""

    delay_s: float
    next_at: float = 0.0
    started_at: float = 0.0
    num_restarts: int = 0


class Supervisor:
    """Restarts the exited children of `processes` (in their order) each time `check` runs.

    A child that exits waits `first_delay_s` before its restart, twice as long after each
    further exit, at most `max_delay_s`; one that stayed up `healthy_s` starts over at
    `first_delay_s`. Restarts append to the child's log. Not thread-safe: call `check` from
    the thread that started the children (their parent-death signal follows that thread).
    """

    def __init__(
        self,
        processes: Sequence[ServerProcess],
        first_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        healthy_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.processes = list(processes)
        self.first_delay_s, self.max_delay_s, self.healthy_s = first_delay_s, max_delay_s, healthy_s
        self._clock = clock
        now = clock()
        self._backoff = {id(p): _Backoff(first_delay_s, started_at=now) for p in self.processes}

    def num_restarts(self, process: ServerProcess) -> int:
        return self._backoff[id(process)].num_restarts

    def check(self) -> list[str]:
        """Restarts every exited child whose delay has passed; returns one line per event
        (an exit seen, a restart) for the log."""
        events: list[str] = []
        now = self._clock()
        for process in self.processes:
            backoff = self._backoff[id(process)]
            if process.running:
                if now - backoff.started_at >= self.healthy_s:
                    backoff.delay_s = self.first_delay_s
                continue
            if backoff.next_at == 0.0:  # first seen exited: schedule the restart
                backoff.next_at = now + backoff.delay_s
                events.append(
                    f"{process.name} exited with code {process.exit_code}; "
                    f"restarting in {backoff.delay_s:.0f} s (log: {process.log_path})"
                )
            elif now >= backoff.next_at:
                process.start(keep_log=True)
                backoff.num_restarts += 1
                backoff.started_at, backoff.next_at = now, 0.0
                backoff.delay_s = min(backoff.delay_s * 2, self.max_delay_s)
                events.append(f"{process.name} restarted (restart {backoff.num_restarts})")
        return events
