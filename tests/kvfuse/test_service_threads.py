"""Compute and I/O threads: torch team sizes per thread, priorities, where threads start."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import torch

from kvfuse.service.threads import (
    IO_NICE,
    ThreadStarter,
    compute_thread,
    io_thread,
    on_temporary_thread,
)

T = TypeVar("T")
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice is Linux's")


@pytest.fixture(autouse=True)
def restore_torch_default() -> Iterator[None]:
    yield
    in_new_thread(compute_thread)  # threads started later take the count set last


def in_new_thread(fn: Callable[[], T]) -> T:
    box: list[T] = []
    thread = threading.Thread(target=lambda: box.append(fn()))
    thread.start()
    thread.join()
    return box[0]


def then(first: Callable[[], None], probe: Callable[[], T]) -> Callable[[], T]:
    """A function that calls `first`, then returns what `probe` sees (both in the same thread)."""

    def run() -> T:
        first()
        return probe()

    return run


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def parallel_op() -> None:
    torch.ones(1 << 22).mul(2).sum()  # large enough for torch to go parallel


def test_io_thread_is_single_threaded_without_changing_this_thread() -> None:
    before = torch.get_num_threads()
    assert in_new_thread(then(io_thread, torch.get_num_threads)) == 1
    assert torch.get_num_threads() == before


def test_compute_thread_keeps_its_count_when_an_io_thread_sets_one_later() -> None:
    # A thread's first parallel operator resets its count to the last one any thread set:
    # compute_thread must have run that step already, or the I/O thread's 1 would win.
    ready, io_done = threading.Event(), threading.Event()
    seen: list[int] = []

    def compute() -> None:
        compute_thread(2)
        ready.set()
        io_done.wait()
        parallel_op()
        seen.append(torch.get_num_threads())

    worker = threading.Thread(target=compute)
    worker.start()
    ready.wait()
    in_new_thread(io_thread)
    io_done.set()
    worker.join()
    assert seen == [2]


def test_compute_thread_zero_means_torchs_default_even_after_an_io_thread() -> None:
    default = torch.get_num_threads()
    in_new_thread(io_thread)
    assert in_new_thread(then(lambda: compute_thread(0), torch.get_num_threads)) == default
    assert in_new_thread(then(lambda: compute_thread(3), torch.get_num_threads)) == 3


@linux_only
def test_io_thread_lowers_only_its_own_priority() -> None:
    mine = own_nice()
    assert in_new_thread(then(io_thread, own_nice)) >= max(IO_NICE, mine)
    assert own_nice() == mine


@linux_only
def test_thread_starter_starts_threads_at_its_creators_priority() -> None:
    starter = ThreadStarter()
    mine = own_nice()

    def lowered_thread_asks() -> int:
        io_thread()  # this thread drops to IO_NICE; the one it asks for must not
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(own_nice()))
        starter.start(thread)
        thread.join()
        return seen[0]

    assert in_new_thread(lowered_thread_asks) == mine


def test_thread_starter_raises_the_start_error_to_the_caller() -> None:
    starter = ThreadStarter()
    thread = threading.Thread(target=lambda: None)
    starter.start(thread)
    thread.join()
    with pytest.raises(RuntimeError, match="once"):
        starter.start(thread)  # a thread starts once


def test_on_temporary_thread_returns_or_raises_from_another_thread() -> None:
    here = threading.get_ident()
    assert on_temporary_thread(threading.get_ident) != here

    def fail() -> None:
        raise ValueError("from the temporary thread")

    with pytest.raises(ValueError, match="temporary thread"):
        on_temporary_thread(fail)
