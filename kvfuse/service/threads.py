"""Which threads run torch in parallel, and at what CPU priority.

Measured on 2 cores with a bf16 blend prefill of a 3,798-token prompt (0.7 s on its own):

- torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that ever
  ran a parallel operator, until that thread ends. Once a process holds more such threads than
  CPUs, the teams stop spinning between operators and each of the prefill's ~1,000 operators
  pays a wake-up: one idle second team (the thread that loaded the model) made the prefill
  1.3 s. So only compute threads run torch in parallel; every other thread calls `io_thread()`
  (torch single-threaded there), and services load models with `on_temporary_thread`.
- `torch.set_num_threads` sets the calling thread's team size, but a thread's first parallel
  operator resets it to the count any thread set last: a compute thread that started before
  an I/O thread's `set_num_threads(1)` ran single-threaded. `compute_thread` and `io_thread`
  run that first-use step before they set their count.
- A thread moving bytes on a core the compute uses delays each parallel region (one busy 30%
  of a core: 1.3 s). At nice 10 it runs in the compute's gaps instead (0.9 s): `io_thread()`
  lowers the calling thread's priority (Linux nice values are per thread). An unprivileged
  thread cannot raise its priority again and new threads inherit their creator's, so a lowered
  thread never starts a compute thread itself: `ThreadStarter` starts them from a thread that
  keeps its priority.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

IO_NICE = 10  # CFS weight 110 vs 1024 at nice 0: about a tenth of a contended core
T = TypeVar("T")
_DEFAULT_NUM_THREADS = torch.get_num_threads()  # read before any thread here changes it


def io_thread(nice: int = IO_NICE) -> None:
    """Makes the calling thread an I/O thread: torch single-threaded on it, nice ≥ `nice`."""
    _set_torch_threads(1)
    lower_thread_priority(nice)


def compute_thread(num_threads: int = 0) -> None:
    """Sizes the calling thread's torch team: `num_threads`, or torch's default if 0."""
    _set_torch_threads(num_threads or _DEFAULT_NUM_THREADS)


def torch_default_threads() -> int:
    """torch's thread count before any thread here changed it (normally one per core)."""
    return _DEFAULT_NUM_THREADS


def _set_torch_threads(num_threads: int) -> None:
    torch.get_num_threads()  # the first-use step (see above), so the count set next holds
    torch.set_num_threads(num_threads)


def lower_thread_priority(nice: int) -> None:
    """Raises the calling OS thread's nice value to `nice` (never lowers it; 0 is a no-op).

    Linux only; elsewhere, or where the kernel refuses, the priority stays as it is.
    """
    if nice <= 0 or sys.platform != "linux":
        return
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError:
        pass


def on_temporary_thread(fn: Callable[[], T]) -> T:
    """Runs `fn` on a new thread and returns its result (or raises its error); the torch team
    that thread built ends with it."""
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # re-raised on the calling thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="kvfuse-temporary")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return outcome[0]


class ThreadStarter:
    """Starts threads from one long-lived thread, so they get the priority of the thread that
    created the starter rather than that of the (possibly lowered) thread asking. Thread-safe.
    """

    def __init__(self, name: str = "kvfuse-thread-starter") -> None:
        self._requests: queue.SimpleQueue[_StartRequest] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def start(self, thread: threading.Thread) -> None:
        """Starts `thread` and returns once it runs (like `thread.start()`)."""
        request = _StartRequest(thread)
        self._requests.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error

    def _run(self) -> None:
        while True:
            request = self._requests.get()
            try:
                request.thread.start()
            except BaseException as exc:  # e.g. "can't start new thread": the caller's error
                request.error = exc
            request.done.set()


@dataclass
class _StartRequest:
    thread: threading.Thread
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
