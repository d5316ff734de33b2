"""How hot each stored object is: lookups that found it, decayed with a half-life, so the
controller can keep what requests keep asking for in memory and move the rest down."""

from __future__ import annotations

import heapq
import math
import threading
import time
from collections.abc import Callable, Iterable


class Heat:
    """Decayed hit counts per storage key. Thread-safe; O(1) per touch.

    A count decays by half every `half_life_s`: an object looked up once an hour ago weighs
    what one looked up twice two half-lives earlier does. Entries that cooled below
    `floor` are pruned when the table outgrows `max_keys`.
    """

    def __init__(
        self,
        half_life_s: float = 300.0,
        max_keys: int = 1_000_000,
        floor: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = math.log(2) / half_life_s
        self._max_keys, self._floor, self._clock = max_keys, floor, clock
        self._heat: dict[str, tuple[float, float]] = {}  # key → (count, when)
        self._lock = threading.Lock()

    def touch(self, keys: Iterable[str]) -> None:
        now = self._clock()
        with self._lock:
            for key in keys:
                self._heat[key] = (self._value(key, now) + 1.0, now)
            if len(self._heat) > self._max_keys:
                self._prune(now)

    def forget(self, key: str) -> None:
        with self._lock:
            self._heat.pop(key, None)

    def of(self, key: str) -> float:
        with self._lock:
            return self._value(key, self._clock())

    def ranked(self, keys: Iterable[str], limit: int, hottest: bool) -> list[tuple[str, float]]:
        """Up to `limit` of `keys` by heat (hottest or coldest first), ties by key."""
        now = self._clock()
        with self._lock:
            scored = [(self._value(key, now), key) for key in keys]
        if hottest:
            best = heapq.nsmallest(limit, scored, key=lambda sk: (-sk[0], sk[1]))
        else:
            best = heapq.nsmallest(limit, scored)
        return [(key, value) for value, key in best]

    def __len__(self) -> int:
        return len(self._heat)

    def _value(self, key: str, now: float) -> float:
        count, when = self._heat.get(key, (0.0, now))
        return count * math.exp(-self._rate * (now - when))

    def _prune(self, now: float) -> None:
        cold = [k for k in self._heat if self._value(k, now) < self._floor]
        for key in cold:
            del self._heat[key]
        if len(self._heat) > self._max_keys:  # everything is warm: drop the coldest half
            ranked = sorted(self._heat, key=lambda k: self._value(k, now))
            for key in ranked[: len(ranked) // 2]:
                del self._heat[key]
