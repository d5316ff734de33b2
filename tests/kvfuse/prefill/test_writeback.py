"""WriteBehind on a tiny random Llama: stores missing chunks, drops under pressure, dedupes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.errors import CapacityError
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import load_model
from kvfuse.prefill.writeback import WriteBehind, WriteJob
from kvfuse.segments import PromptSegments
from kvfuse.service.threads import io_thread
from prefill_worker.metrics import PrefillMetrics

T = TypeVar("T")


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Callable[[str], Path], cache_dir: Path) -> Engine:
    return Engine(load_model(tiny_model_dir("llama"), cache_dir, torch.float32), ChunkStore(1))


def prompt(engine: Engine, first: int = 10) -> PreparedPrompt:
    chunks = tuple(tuple(range(first + 10 * i, first + 10 * i + 6)) for i in range(3))
    return engine.compute.prepare(PromptSegments((1, 2, 3), chunks, (4, 5)))


class Recorder:
    def __init__(self, error: Exception | None = None) -> None:
        self.stored: dict[str, ChunkKV] = {}
        self.num_calls = 0
        self.error = error

    def __call__(self, key: str, kv: ChunkKV) -> bool:
        self.num_calls += 1
        if self.error is not None:
            raise self.error
        self.stored[key] = kv
        return True


def on_io_thread(fn: Callable[[], T]) -> T:
    """fn's result, computed on a thread set up as the write-behind thread sets up its own."""
    results: list[T] = []

    def run() -> None:
        io_thread(nice=0)
        results.append(fn())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return results[0]


def value(metrics: PrefillMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name) or 0.0


def test_stores_exactly_the_missing_objects(tiny_engine: Engine) -> None:
    p = prompt(tiny_engine)
    store, metrics = Recorder(), PrefillMetrics()
    writer = WriteBehind(tiny_engine.compute, store, 8, threading.Lock(), metrics)
    missing = frozenset({p.prefix_key, p.chunk_keys[1]})
    assert writer.submit(WriteJob(p, missing))
    assert writer.wait_idle(60)
    assert set(store.stored) == missing
    # computed as the writer computes them: on one torch thread (an I/O thread), since a sum
    # split across two threads may round differently (MKL's sgemm on AVX2 does)
    expected = on_io_thread(
        lambda: dict(tiny_engine.compute.missing(p, lambda k: k not in missing, lambda k: None))
    )
    for key in missing:
        assert torch.equal(store.stored[key].k, expected[key].k)
    assert value(metrics, "kvfuse_prefill_write_behind_stored_total") == 2
    assert value(metrics, "kvfuse_prefill_write_behind_queue_depth") == 0
    writer.close()


def test_drops_and_counts_work_beyond_its_capacity(tiny_engine: Engine) -> None:
    p, metrics = prompt(tiny_engine), PrefillMetrics()
    writer = WriteBehind(tiny_engine.compute, Recorder(), 3, threading.Lock(), metrics)
    assert not writer.submit(WriteJob(p, frozenset([p.prefix_key, *p.chunk_keys])))
    assert value(metrics, "kvfuse_prefill_write_behind_dropped_total") == 4
    off = WriteBehind(tiny_engine.compute, Recorder(), 0, threading.Lock(), metrics)
    assert not off.submit(WriteJob(p, frozenset(p.chunk_keys[:1])))
    writer.close()
    off.close()


def test_queued_keys_are_not_queued_twice(tiny_engine: Engine) -> None:
    p, lock, store = prompt(tiny_engine), threading.Lock(), Recorder()
    writer = WriteBehind(tiny_engine.compute, store, 8, lock, PrefillMetrics())
    with lock:  # a request is computing: the writer cannot start
        assert writer.submit(WriteJob(p, frozenset(p.chunk_keys)))
        assert writer.submit(WriteJob(p, frozenset(p.chunk_keys[:2])))
        assert writer.depth == 3
    assert writer.wait_idle(60)
    assert store.num_calls == 3 and set(store.stored) == set(p.chunk_keys)
    writer.close()


def test_a_failed_store_is_counted_and_the_queue_keeps_draining(tiny_engine: Engine) -> None:
    metrics = PrefillMetrics()
    writer = WriteBehind(
        tiny_engine.compute, Recorder(CapacityError("full")), 8, threading.Lock(), metrics
    )
    p = prompt(tiny_engine)
    assert writer.submit(WriteJob(p, frozenset(p.chunk_keys)))
    assert writer.wait_idle(60)
    assert value(metrics, "kvfuse_prefill_write_behind_errors_total") == 3
    assert writer.depth == 0
    writer.close()
