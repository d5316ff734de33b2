"""What both warmers share: the objects of a prompt, storing computed objects one lock at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from kvfuse.blend.plan import PreparedPrompt
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import ChunkKV
from kvfuse.segments import PromptSegments
from kvfuse.warm import store_computed, warm_objects


def kv(num_tokens: int) -> ChunkKV:
    k = torch.zeros(2, num_tokens, 1, 4)
    return ChunkKV(k, k.clone(), torch.arange(num_tokens))


def test_objects_are_the_prefix_then_each_distinct_chunk() -> None:
    seg = PromptSegments((1,), ((2,), (3,), (2,)), (4,))
    prompt = PreparedPrompt(seg, "p", ("a", "b", "a"))
    assert warm_objects(prompt) == ["p", "a", "b"]
    assert warm_objects(PreparedPrompt(PromptSegments((), ((2,),), ()), "p", ("a",))) == ["a"]


def test_store_counts_stored_raced_and_failed_objects() -> None:
    lock = threading.Lock()
    held: list[bool] = []

    def computed() -> Iterator[tuple[str, ChunkKV]]:
        for key, num_tokens in (("prefix", 2), ("new", 3), ("raced", 4), ("broken", 5)):
            held.append(lock.locked())  # each object is computed under the lock
            yield key, kv(num_tokens)

    def store(key: str, obj: ChunkKV) -> bool:
        assert not lock.locked()  # stores happen outside it
        if key == "broken":
            raise ServiceUnavailableError("UNAVAILABLE")
        return key != "raced"  # False: someone stored it meanwhile

    present = {"prefix"}
    assert store_computed(computed(), present, lock, store) == (1, 1, 14)
    assert present == {"prefix", "raced"} and held == [True] * 4


def test_a_non_kvfuse_error_is_not_swallowed() -> None:
    def store(key: str, obj: ChunkKV) -> bool:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        store_computed(iter([("a", kv(1))]), set(), threading.Lock(), store)
