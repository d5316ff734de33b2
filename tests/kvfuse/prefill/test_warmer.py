"""Warmer on a tiny random Llama: which objects a warm call stores, and what it counts."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from kvfuse.chunk_store import ChunkStore
from kvfuse.client import Entry
from kvfuse.engine import Engine
from kvfuse.errors import ServiceUnavailableError
from kvfuse.keys import PreparedPrompt
from kvfuse.kv import ChunkKV, LayerFrame
from kvfuse.model.loader import load_model
from kvfuse.prefill import ChunkInfo, WarmResult
from kvfuse.prefill.observer import PrefillObserver
from kvfuse.prefill.sources import Shards
from kvfuse.prefill.warm import Warmer
from kvfuse.segments import PromptSegments


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Callable[[str], Path], cache_dir: Path) -> Engine:
    return Engine(load_model(tiny_model_dir("llama"), cache_dir, torch.float32), ChunkStore(1))


class Source:
    """Holds `present`; stores raise for `broken` and say "already there" for `raced`."""

    def __init__(self, present: set[str], raced: set[str], broken: set[str]) -> None:
        self.present, self.raced, self.broken = present, raced, broken
        self.stored: dict[str, ChunkKV] = {}
        self.lock = threading.Lock()
        self.held_while_storing: list[bool] = []

    def lookup(self, keys: Sequence[str]) -> dict[str, ChunkInfo]:
        entry = Entry("k", "memory", 1, False, 2, 1, 1, 1, "float32", "raw", 0)
        return {key: entry for key in keys if key in self.present}

    def get_layers(self, keys: Sequence[str]) -> Iterator[LayerFrame]:
        raise AssertionError("a warm call never reads layers")

    def put(self, key: str, kv: ChunkKV) -> bool:
        self.held_while_storing.append(self.lock.locked())
        if key in self.broken:
            raise ServiceUnavailableError("UNAVAILABLE")
        if key in self.raced:
            return False
        self.stored[key] = kv
        return True


class Observed(PrefillObserver):
    def __init__(self) -> None:
        self.results: list[WarmResult] = []

    def warmed(self, result: WarmResult) -> None:
        self.results.append(result)


def test_objects_are_the_prefix_then_each_distinct_chunk() -> None:
    seg = PromptSegments((1,), ((2,), (3,), (2,)), (4,))
    assert PreparedPrompt(seg, "p", ("a", "b", "a")).object_keys == ["p", "a", "b"]
    no_prefix = PreparedPrompt(PromptSegments((), ((2,),), ()), "p", ("a",))
    assert no_prefix.object_keys == ["a"]


def test_counts_present_stored_raced_and_failed_objects(tiny_engine: Engine) -> None:
    chunks = tuple(tuple(range(10 * i + 5, 10 * i + 11)) for i in range(4))
    seg = PromptSegments((1, 2, 3), chunks, (4,))
    prompt = tiny_engine.compute.prepare(seg)
    prefix, (new, raced, broken, stored_before) = prompt.prefix_key, prompt.chunk_keys
    source = Source({prefix, stored_before}, {raced}, {broken})
    observer = Observed()
    warmer = Warmer(tiny_engine.compute, Shards([source], ["one"]), source.lock, observer)
    result = warmer.warm_chunks(seg)
    assert (result.num_objects, result.num_present, result.num_stored) == (5, 3, 1)
    assert result.num_failed == 1 and set(source.stored) == {new}
    assert result.num_computed_tokens == 3 + 3 * 6  # the prefix (as context) and three chunks
    assert not any(source.held_while_storing)  # stores happen outside the compute lock
    assert observer.results == [result]
    expected = dict(tiny_engine.compute.missing(prompt, lambda k: k != new, lambda _k: None))
    assert torch.equal(source.stored[new].k, expected[new].k)
