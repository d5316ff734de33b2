"""The worker's cache shards following the controller's membership: servers that stay keep
their connections (and their rendezvous name, so their keys stay put), new ones are dialled,
departed ones are closed once in-flight requests can no longer be using them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from kvfuse.control.policy import CacheMember
from kvfuse.prefill.sources import CacheServerSource, ChunkSource, Shards

log = logging.getLogger(__name__)


class ShardSwitch:
    """Builds and installs new `Shards` when the member list changes. Thread-safe.

    Args:
        shards: the shards in use now (from the worker's own configuration).
        dial: opens a source for an address.
        install: puts new shards in use (an atomic attribute swap on each user).
        linger_s: how long a departed server's source stays open for requests that took the
            old shards (their fetch and put deadlines).
    """

    def __init__(
        self,
        shards: Shards,
        dial: Callable[[str], CacheServerSource],
        install: Callable[[Shards], None],
        linger_s: float,
    ) -> None:
        self.shards, self._dial, self._install = shards, dial, install
        self._linger_s = linger_s
        self._lock = threading.Lock()

    def update(self, members: Sequence[CacheMember]) -> bool:
        """Switches to `members` (empty: keep the current shards); True if they changed."""
        members = sorted(set(members))
        with self._lock:
            old = self.shards
            current = {
                (name, getattr(src, "addr", name)): src
                for name, src in zip(old.names, old.sources, strict=True)
            }
            wanted = [(m.name, m.address) for m in members]
            if not members or wanted == sorted(current):
                return False
            sources: list[ChunkSource] = [current.get(w) or self._dial(w[1]) for w in wanted]
            self.shards = Shards(sources, [name for name, _ in wanted])
            self._install(self.shards)
            gone = [src for key, src in current.items() if key not in set(wanted)]
        log.info("cache shards now %s", ", ".join(f"{n}={a}" for n, a in wanted))
        if gone:
            timer = threading.Timer(self._linger_s, _close, [gone])
            timer.daemon = True
            timer.start()
        return True


def _close(sources: list[ChunkSource]) -> None:
    for source in sources:
        close = getattr(source, "close", None)
        if close is not None:
            close()
