"""TinyLFU-style admission: a count-min sketch of recent access frequencies, aged by halving."""

from __future__ import annotations

import hashlib

NUM_ROWS = 4
MAX_COUNT = 15  # 4-bit saturating counters, as in TinyLFU
_HALF = bytes(count >> 1 for count in range(256))  # translation table: counter -> counter // 2


class FrequencySketch:
    """Approximate access counts per key over a sliding window. Not thread-safe (callers lock).

    A count-min sketch of `NUM_ROWS` rows × `width` saturating counters. After
    `sample_size` increments every counter is halved, so the counts describe recent history
    (TinyLFU's reset). Estimates never undercount within a window and overcount only through
    hash collisions.

    Args:
        width: counters per row, rounded up to a power of two (≥ 64). Size it to a few times
            the number of distinct keys the tier can hold.
        sample_size: increments between two halvings; default 10 × width.
    """

    def __init__(self, width: int = 1 << 14, sample_size: int | None = None) -> None:
        self.width = 1 << max(6, (width - 1).bit_length())
        self.sample_size = sample_size if sample_size is not None else 10 * self.width
        self._rows = [bytearray(self.width) for _ in range(NUM_ROWS)]
        self._num_increments = 0

    def _slots(self, key: str) -> list[int]:
        digest = hashlib.blake2b(key.encode(), digest_size=4 * NUM_ROWS).digest()
        mask = self.width - 1
        return [int.from_bytes(digest[4 * r : 4 * r + 4], "little") & mask for r in range(NUM_ROWS)]

    def increment(self, key: str) -> None:
        """Counts one access of `key` (conservative update: only the minimal counters grow)."""
        slots = self._slots(key)
        counts = [row[slot] for row, slot in zip(self._rows, slots, strict=True)]
        low = min(counts)
        if low < MAX_COUNT:
            for row, slot, count in zip(self._rows, slots, counts, strict=True):
                if count == low:
                    row[slot] = low + 1
        self._num_increments += 1
        if self._num_increments >= self.sample_size:
            self._halve()

    def estimate(self, key: str) -> int:
        """Estimated number of recent accesses of `key` (0..MAX_COUNT)."""
        return min(row[slot] for row, slot in zip(self._rows, self._slots(key), strict=True))

    def _halve(self) -> None:
        for row in self._rows:
            row[:] = row.translate(_HALF)
        self._num_increments //= 2
