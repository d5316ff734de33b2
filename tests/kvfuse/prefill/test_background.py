"""BackgroundIterator: order, bounded lookahead, errors after items, cancel runs cleanup."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from prefill_helpers import poll

from kvfuse.errors import KvfuseError
from kvfuse.prefill.background import BackgroundIterator


def test_yields_everything_in_order() -> None:
    assert list(BackgroundIterator(lambda: iter(range(100)), depth=3)) == list(range(100))


def test_producer_stays_at_most_depth_items_ahead() -> None:
    produced: list[int] = []

    def produce() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i

    it = BackgroundIterator(produce, depth=2)
    poll(lambda: len(produced) >= 3, what="the producer to fill the queue")
    assert produced == [0, 1, 2]  # 0 and 1 handed over, 2 waiting for room
    for taken, item in enumerate(it, start=1):
        assert item == taken - 1
        assert len(produced) <= taken + 3
    assert produced == list(range(10))


def test_error_is_raised_after_the_items_before_it() -> None:
    def produce() -> Iterator[int]:
        yield 1
        raise KvfuseError("boom")

    it = BackgroundIterator(produce, depth=4)
    assert next(it) == 1
    with pytest.raises(KvfuseError, match="boom"):
        next(it)


def test_cancel_wakes_the_reader_and_closes_the_producer() -> None:
    cleaned, cancelled = threading.Event(), threading.Event()
    gate = threading.Event()

    def produce() -> Iterator[int]:
        try:
            yield 0
            gate.wait(30)  # blocked "on I/O" until on_cancel releases it
            yield 1
            yield 2
        finally:
            cleaned.set()

    def on_cancel() -> None:
        cancelled.set()
        gate.set()

    it = BackgroundIterator(produce, depth=1, on_cancel=on_cancel)
    assert next(it) == 0
    it.cancel()
    it.cancel()  # idempotent
    assert cancelled.is_set()
    assert list(it) == []
    assert it.join(30) and cleaned.is_set() and it.finished
