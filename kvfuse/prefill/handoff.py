"""Fused KV held on the prefill worker for a decode engine's KV connector to take.

Prefill/decode disaggregation with vLLM as the decode engine: the decode front asks the prefill
worker for a prompt under a hand-off id; the worker keeps the fused layers under that id
instead of streaming them back, and the connector inside vLLM takes them (`HandoffBoard.take`)
layer by layer, while later layers are still being computed. The taker names the token ids it
will decode from (their digest), so a fused KV is never loaded for any other prompt.

An entry lives until it has been taken once, or `ttl_s` after it was opened; the board holds
at most `capacity_bytes` of layers and drops the oldest entries to make room (their takers get
a `HandoffError`: vLLM then computes the prompt itself).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import numpy as np

from kvfuse.blend.run import FusedLayer
from kvfuse.errors import HandoffError, InvalidRequestError
from kvfuse.prefill.types import PrefillResult

DIGEST_BYTES = 32


def prompt_digest(token_ids: Sequence[int]) -> bytes:
    """SHA-256 of a prompt's token ids as little-endian uint32: what a hand-off is keyed to."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<u4").tobytes()).digest()


def _layer_nbytes(layer: FusedLayer) -> int:
    return layer.k.nbytes + layer.v.nbytes


class Handoff:
    """One prompt's fused layers, appended by its prefill and read once by its taker.

    The prefill calls `put` per layer, then `finish` (or `fail`); `read` yields the layers in
    order as they arrive, then the result. Thread-safe: writer and reader are different threads.
    """

    def __init__(self, handoff_id: str, digest: bytes, num_tokens: int, opened_s: float) -> None:
        self.handoff_id, self.digest, self.num_tokens = handoff_id, digest, num_tokens
        self.opened_s = opened_s
        self.nbytes = 0
        self._layers: list[FusedLayer] = []
        self._result: PrefillResult | None = None
        self._error: str | None = None
        self._changed = threading.Condition()

    def put(self, layer: FusedLayer) -> None:
        """Appends the next layer (ignored once the entry failed)."""
        with self._changed:
            if self._error is not None:
                return
            self._layers.append(layer)
            self.nbytes += _layer_nbytes(layer)
            self._changed.notify_all()

    def finish(self, result: PrefillResult) -> None:
        with self._changed:
            self._result = result
            self._changed.notify_all()

    def fail(self, reason: str) -> None:
        """Ends the entry without a result; a reader raises HandoffError(reason). Idempotent:
        the first reason stays, a finished entry stays finished."""
        with self._changed:
            if self._result is None and self._error is None:
                self._error = reason
                self._layers.clear()
                self._changed.notify_all()

    @property
    def done(self) -> bool:
        with self._changed:
            return self._result is not None or self._error is not None

    def _has_news(self, num_read: int) -> bool:
        return num_read < len(self._layers) or self._result is not None or bool(self._error)

    def read(self, timeout_s: float) -> Iterator[FusedLayer | PrefillResult]:
        """Layers 0, 1, … as they arrive, then the result.

        Raises:
            HandoffError: the prefill failed or was dropped, or nothing new arrived for
                `timeout_s`.
        """
        idx = 0  # layers read so far
        while True:
            with self._changed:
                ready = self._changed.wait_for(partial(self._has_news, idx), timeout_s)
                if self._error is not None:
                    raise HandoffError(f"hand-off {self.handoff_id}: {self._error}")
                if not ready:
                    raise HandoffError(f"hand-off {self.handoff_id}: no layer in {timeout_s} s")
                if idx < len(self._layers):
                    item: FusedLayer | PrefillResult = self._layers[idx]
                    idx += 1
                else:
                    assert self._result is not None
                    item = self._result
            yield item
            if isinstance(item, PrefillResult):
                return


class HandoffBoard:
    """The hand-offs a prefill worker holds, by id. Thread-safe.

    Lifecycle of an id: `open` (by the prefill), `take` (once, by the connector; waits for the
    `open` if the connector is first), then gone. Entries are also dropped `ttl_s` after they
    were opened, and oldest first when the board's layers exceed `capacity_bytes` (counted as
    layers arrive: `reserve` is called by each `put`).

    Args:
        capacity_bytes: most bytes of fused layers held at once.
        ttl_s: how long an entry waits for its taker.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self, capacity_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if capacity_bytes <= 0 or ttl_s <= 0:
            raise InvalidRequestError("hand-off capacity and ttl must be positive")
        self.capacity_bytes, self.ttl_s, self._clock = capacity_bytes, ttl_s, clock
        self._entries: OrderedDict[str, Handoff] = OrderedDict()
        self._changed = threading.Condition()
        self.num_dropped = 0

    def open(self, handoff_id: str, token_ids: Sequence[int]) -> Handoff:
        """A new entry for a prompt about to be prefilled.

        Raises:
            InvalidRequestError: empty id, or an id already held.
        """
        if not handoff_id:
            raise InvalidRequestError("a hand-off needs a non-empty id")
        with self._changed:
            self._expire()
            if handoff_id in self._entries:
                raise InvalidRequestError(f"hand-off id {handoff_id!r} is already in use")
            entry = Handoff(handoff_id, prompt_digest(token_ids), len(token_ids), self._clock())
            self._entries[handoff_id] = entry
            self._changed.notify_all()
            return entry

    def put(self, entry: Handoff, layer: FusedLayer) -> None:
        """Appends a layer, first dropping the oldest other entries while over capacity (or
        failing `entry` itself when it alone exceeds it)."""
        with self._changed:
            need = _layer_nbytes(layer)
            while self._held_bytes() + need > self.capacity_bytes:
                oldest = next((e for e in self._entries.values() if e is not entry), None)
                if oldest is None:
                    self._drop(entry, "larger than the hand-off capacity")
                    return
                self._drop(oldest, "dropped to make room (hand-off capacity)")
            entry.put(layer)

    def take(
        self, handoff_id: str, token_ids_digest: bytes, num_tokens: int, wait_s: float
    ) -> Handoff:
        """Removes and returns the entry for `handoff_id`, waiting up to `wait_s` for the
        prefill to open it.

        Raises:
            HandoffError: no such entry in time, or it was made for other token ids.
        """
        with self._changed:
            self._expire()
            if not self._changed.wait_for(lambda: handoff_id in self._entries, wait_s):
                raise HandoffError(f"no hand-off {handoff_id!r} (unknown, taken or expired)")
            entry = self._entries.pop(handoff_id)
        if entry.digest != token_ids_digest or entry.num_tokens != num_tokens:
            entry.fail("taken for other token ids")
            raise HandoffError(
                f"hand-off {handoff_id!r} holds {entry.num_tokens} other tokens than the "
                f"{num_tokens} asked for"
            )
        return entry

    def discard(self, entry: Handoff, reason: str) -> None:
        """Drops `entry` if still held (its prefill failed or was cancelled)."""
        with self._changed:
            self._drop(entry, reason)

    @property
    def held_bytes(self) -> int:
        with self._changed:
            return self._held_bytes()

    def __len__(self) -> int:
        with self._changed:
            return len(self._entries)

    def _held_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _expire(self) -> None:
        now_s = self._clock()
        for entry in [e for e in self._entries.values() if now_s - e.opened_s > self.ttl_s]:
            self._drop(entry, f"not taken within {self.ttl_s} s")

    def _drop(self, entry: Handoff, reason: str) -> None:
        if self._entries.get(entry.handoff_id) is entry:
            del self._entries[entry.handoff_id]
            self.num_dropped += 1
        entry.fail(reason)
