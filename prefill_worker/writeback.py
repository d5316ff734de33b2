"""Write-behind: store a request's missing chunks (precomputing them if it did not), off the
request path."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from kvfuse.blend.plan import PreparedPrompt
from kvfuse.engine import Engine
from kvfuse.errors import KvfuseError
from kvfuse.kv import ChunkKV
from kvfuse.service.threads import io_thread
from prefill_worker.metrics import PrefillMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteJob:
    """The objects of one prompt to precompute and store.

    Attributes:
        prompt: the request's prepared prompt (keys and token ids).
        missing: the keys (prefix and/or chunks) to compute and store.
        prefix_kv: the prefix's KV when it was fetched whole (the chunk context under
            ChunkContext.PREFIX); None computes it.
        computed: missing objects the request already computed (`MissPolicy.PRECOMPUTE`):
            stored as they are, with no model compute.
    """

    prompt: PreparedPrompt
    missing: frozenset[str]
    prefix_kv: ChunkKV | None = None
    computed: Mapping[str, ChunkKV] = field(default_factory=dict)


class WriteBehind:
    """A bounded queue of chunk objects to precompute and store, drained by one daemon thread.

    `submit` never blocks: when the queued objects would exceed `capacity`, the job is dropped
    and counted (kvfuse_prefill_write_behind_dropped_total). Keys already queued are not queued
    twice. An object the job brings already computed is only stored; any other is computed
    under `compute_lock` (shared with requests, so requests wait for at most one chunk). Each
    is stored with `store(key, kv)`; a failed store is counted, not retried. Thread-safe;
    `close` stops the thread after the job it is on.
    """

    def __init__(
        self,
        engine: Engine,
        store: Callable[[str, ChunkKV], bool],
        capacity: int,
        compute_lock: AbstractContextManager[object],
        metrics: PrefillMetrics,
    ) -> None:
        self._engine, self._store, self._capacity = engine, store, capacity
        self._compute_lock, self._metrics = compute_lock, metrics
        self._jobs: queue.Queue[WriteJob | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: set[str] = set()  # keys queued or being computed
        self._idle = threading.Condition(self._lock)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefill-write-behind", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Objects queued or being computed."""
        with self._lock:
            return len(self._pending)

    def submit(self, job: WriteJob) -> bool:
        """Queues the job's keys that are not already pending; False if it was dropped."""
        with self._lock:
            missing = job.missing - self._pending
            if not missing:
                return True
            if self._capacity == 0 or len(self._pending) + len(missing) > self._capacity:
                self._metrics.write_behind_dropped.inc(len(missing))
                return False
            self._pending |= missing
            self._metrics.write_behind_depth.set(len(self._pending))
        self._jobs.put(WriteJob(job.prompt, frozenset(missing), job.prefix_kv, job.computed))
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Blocks until nothing is pending (tests, graceful stop); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops after the job in progress; queued jobs are dropped (not counted)."""
        self._closing.set()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        io_thread()  # mostly stores; a chunk it computes must not slow a request's compute
        while (job := self._jobs.get()) is not None and not self._closing.is_set():
            try:
                self._write(job)
            except KvfuseError as exc:
                self._metrics.write_behind_errors.inc()
                log.warning("write-behind job failed: %s", exc)
            except Exception:  # a thread boundary: log it and keep draining
                self._metrics.write_behind_errors.inc()
                log.exception("write-behind job failed unexpectedly")
            finally:
                self._done(job.missing)

    def _write(self, job: WriteJob) -> None:
        for key in job.missing & job.computed.keys():
            if self._closing.is_set():
                return
            self._put(key, job.computed[key])
        remaining = job.missing - job.computed.keys()
        if not remaining:
            return
        computed = self._engine.compute_missing(
            job.prompt,
            contains=lambda key: key not in remaining,
            get_prefix=lambda _key: job.prefix_kv,
        )
        while (item := self._next(computed)) is not None:
            key, kv = item
            if key not in remaining:
                continue  # the prefix, recomputed as chunk context, was stored already
            self._metrics.write_behind_computed.inc()
            self._put(key, kv)

    def _put(self, key: str, kv: ChunkKV) -> None:
        try:
            self._store(key, kv)
            self._metrics.write_behind_stored.inc()
        except KvfuseError as exc:
            self._metrics.write_behind_errors.inc()
            log.warning("storing chunk %s failed: %s", key[:12], exc)
        self._done({key})

    def _next(self, computed: Iterator[tuple[str, ChunkKV]]) -> tuple[str, ChunkKV] | None:
        """The next computed object, computed under the shared compute lock."""
        if self._closing.is_set():
            return None
        with self._compute_lock, torch.inference_mode():
            return next(computed, None)

    def _done(self, keys: Collection[str]) -> None:
        with self._lock:
            self._pending.difference_update(keys)
            self._metrics.write_behind_depth.set(len(self._pending))
            if not self._pending:
                self._idle.notify_all()
