"""Storing a request's missing objects after its answer: inline (the embedded engine) or
behind, off the request path (the prefill worker). Both write a job the same way."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvfuse.errors import KvfuseError
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkKV
from kvfuse.prefill.compute import PrefillCompute
from kvfuse.prefill.observer import PrefillObserver, WriteEvent
from kvfuse.service.threads import io_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteJob:
    """The objects of one prompt to store (precomputing those the request did not).

    Attributes:
        prompt: the request's prepared prompt (keys and token ids).
        missing: the keys (prefix and/or chunks) to store.
        prefix_kv: the prefix's KV when it was fetched whole (the chunk context under
            ChunkContext.PREFIX); None computes it.
        computed: missing objects the request already computed (`MissPolicy.PRECOMPUTE`):
            stored as they are, with no model compute.
    """

    prompt: PreparedPrompt
    missing: frozenset[str]
    prefix_kv: ChunkKV | None = None
    computed: Mapping[str, ChunkKV] = field(default_factory=dict)


class Writer(Protocol):
    """Takes a request's missing objects once its answer is out. Thread-safe."""

    def submit(self, job: WriteJob) -> bool:
        """Stores or queues the job; False if it was dropped."""
        ...


class JobWriter:
    """Writes one job: stores the objects it brings computed, computes the rest one object per
    hold of `compute_lock` (a request waits for at most one object), stores each with `store`.
    A failed store is counted (observer) and logged, never raised.

    `stop` (optional) is checked between objects: once set, the job ends early.
    """

    def __init__(
        self,
        compute: PrefillCompute,
        store: Callable[[str, ChunkKV], bool],
        compute_lock: AbstractContextManager[object],
        observer: PrefillObserver,
        stop: threading.Event | None = None,
    ) -> None:
        self._compute, self._store, self._lock = compute, store, compute_lock
        self._observer, self._stop = observer, stop or threading.Event()

    def write(
        self, job: WriteJob, done: Callable[[Collection[str]], None] = lambda _k: None
    ) -> None:
        """Stores every missing object of `job`, calling `done({key})` after each."""
        for key in job.missing & job.computed.keys():
            if self._stop.is_set():
                return
            self._put(key, job.computed[key])
            done({key})
        remaining = job.missing - job.computed.keys()
        if not remaining:
            return
        computed = self._compute.missing(
            job.prompt,
            contains=lambda key: key not in remaining,
            get_prefix=lambda _key: job.prefix_kv,
        )
        while (item := self._next(computed)) is not None:
            key, kv = item
            if key not in remaining:
                continue  # the prefix, recomputed as chunk context, was stored already
            self._observer.write_behind(WriteEvent.COMPUTED)
            self._put(key, kv)
            done({key})

    def _put(self, key: str, kv: ChunkKV) -> None:
        try:
            self._store(key, kv)
            self._observer.write_behind(WriteEvent.STORED)
        except KvfuseError as exc:
            self._observer.write_behind(WriteEvent.FAILED)
            log.warning("storing chunk %s failed: %s", key[:12], exc)

    def _next(self, computed: Iterator[tuple[str, ChunkKV]]) -> tuple[str, ChunkKV] | None:
        """The next computed object, computed under the compute lock."""
        if self._stop.is_set():
            return None
        with self._lock, torch.inference_mode():
            return next(computed, None)


class WriteNow:
    """A `Writer` that writes each job on the caller's thread before `submit` returns (the
    embedded engine: a request's misses are stored before its call ends)."""

    def __init__(self, writer: JobWriter) -> None:
        self._writer = writer

    def submit(self, job: WriteJob) -> bool:
        self._writer.write(job)
        return True


class WriteBehind:
    """A `Writer` with a bounded queue drained by one daemon thread.

    `submit` never blocks: when the queued objects would exceed `capacity`, the job is dropped
    and counted (`WriteEvent.DROPPED`). Keys already queued are not queued twice. Thread-safe;
    `close` stops the thread after the object it is on.
    """

    def __init__(
        self,
        compute: PrefillCompute,
        store: Callable[[str, ChunkKV], bool],
        capacity: int,
        compute_lock: AbstractContextManager[object],
        observer: PrefillObserver,
    ) -> None:
        self._capacity, self._observer = capacity, observer
        self._closing = threading.Event()
        self._writer = JobWriter(compute, store, compute_lock, observer, self._closing)
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # keys queued or being written
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="prefill-write-behind", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Objects queued or being written."""
        with self._lock:
            return len(self._pending)

    def submit(self, job: WriteJob) -> bool:
        """Queues the job's keys that are not already pending; False if it was dropped."""
        with self._lock:
            missing = job.missing - self._pending
            if not missing:
                return True
            if self._capacity == 0 or len(self._pending) + len(missing) > self._capacity:
                self._observer.write_behind(WriteEvent.DROPPED, len(missing))
                return False
            self._pending |= missing
            self._observer.write_behind_depth(len(self._pending))
        self._jobs.put(WriteJob(job.prompt, frozenset(missing), job.prefix_kv, job.computed))
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocks until nothing is pending (tests, graceful stop); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops after the object in progress; queued jobs are dropped (not counted)."""
        self._closing.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        io_thread()  # mostly stores; a chunk it computes must not slow a request's compute
        while (job := self._jobs.get()) is not None and not self._closing.is_set():
            try:
                self._writer.write(job, self._done)
            except KvfuseError as exc:
                self._observer.write_behind(WriteEvent.FAILED)
                log.warning("write-behind job failed: %s", exc)
            except Exception:  # a thread boundary: log it and keep draining
                self._observer.write_behind(WriteEvent.FAILED)
                log.exception("write-behind job failed unexpectedly")
            finally:
                self._done(job.missing)

    def _done(self, keys: Collection[str]) -> None:
        with self._lock:
            self._pending.difference_update(keys)
            self._observer.write_behind_depth(len(self._pending))
            if not self._pending:
                self._idle.notify_all()
