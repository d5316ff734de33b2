"""HandoffBoard: open/put/take in either order, digests, capacity, expiry, failures."""

from __future__ import annotations

import threading

import pytest
import torch

from kvfuse.blend import FusedLayer
from kvfuse.errors import HandoffError, InvalidRequestError
from kvfuse.prefill import PrefillResult, PrefillStats
from kvfuse.prefill.handoff import HandoffBoard, prompt_digest

TOKENS = [1, 2, 3, 70000]


def layer(idx: int, num_tokens: int = 4) -> FusedLayer:
    k = torch.full((3, num_tokens, 8), float(idx))  # [H_kv, N, D]
    return FusedLayer(layer_idx=idx, k=k, v=-k)


def result() -> PrefillResult:
    stats = PrefillStats(4, 0, 0, 4, 0, 0, 0.1)
    return PrefillResult(first_token_id=5, stats=stats)


def test_prompt_digest_is_sha256_of_little_endian_uint32() -> None:
    assert prompt_digest(TOKENS) == prompt_digest(tuple(TOKENS))
    assert prompt_digest(TOKENS) != prompt_digest([1, 2, 3, 70001])
    assert prompt_digest([1]) != prompt_digest([256])  # byte order matters, not just values


def test_layers_taken_in_order_while_they_arrive() -> None:
    board = HandoffBoard(1 << 20, ttl_s=60)
    taken: list[object] = []

    def taker() -> None:
        entry = board.take("h1", prompt_digest(TOKENS), len(TOKENS), wait_s=10)
        taken.extend(entry.read(timeout_s=10))

    thread = threading.Thread(target=taker)
    thread.start()  # the taker may come first: it waits for the open
    entry = board.open("h1", TOKENS)
    for idx in range(3):
        board.put(entry, layer(idx))
    entry.finish(result())
    thread.join(10)
    assert [item.layer_idx for item in taken[:3]] == [0, 1, 2]  # type: ignore[attr-defined]
    assert isinstance(taken[3], PrefillResult)
    assert len(board) == 0 and board.held_bytes == 0  # taken once, then gone
    with pytest.raises(HandoffError, match="unknown, taken or expired"):
        board.take("h1", prompt_digest(TOKENS), len(TOKENS), wait_s=0)


def test_other_tokens_are_refused_and_the_entry_is_spent() -> None:
    board = HandoffBoard(1 << 20, ttl_s=60)
    board.open("h1", TOKENS)
    with pytest.raises(HandoffError, match="other tokens"):
        board.take("h1", prompt_digest(TOKENS[:-1]), 3, wait_s=0)
    with pytest.raises(HandoffError):
        board.take("h1", prompt_digest(TOKENS), 4, wait_s=0)


def test_duplicate_and_empty_ids_are_refused() -> None:
    board = HandoffBoard(1 << 20, ttl_s=60)
    board.open("h1", TOKENS)
    with pytest.raises(InvalidRequestError, match="already in use"):
        board.open("h1", TOKENS)
    with pytest.raises(InvalidRequestError):
        board.open("", TOKENS)


def test_a_failed_prefill_fails_its_reader() -> None:
    board = HandoffBoard(1 << 20, ttl_s=60)
    entry = board.open("h1", TOKENS)
    board.put(entry, layer(0))
    taken = board.take("h1", prompt_digest(TOKENS), 4, wait_s=0)
    reader = taken.read(timeout_s=10)
    assert next(reader).layer_idx == 0  # type: ignore[union-attr]
    board.discard(entry, "its prefill failed")
    with pytest.raises(HandoffError, match="its prefill failed"):
        next(reader)


def test_a_stalled_prefill_times_out_its_reader() -> None:
    board = HandoffBoard(1 << 20, ttl_s=60)
    board.open("h1", TOKENS)
    entry = board.take("h1", prompt_digest(TOKENS), 4, wait_s=0)
    with pytest.raises(HandoffError, match="no layer in"):
        list(entry.read(timeout_s=0.01))


def test_capacity_drops_the_oldest_entry_first() -> None:
    one_layer = layer(0).k.nbytes * 2
    board = HandoffBoard(3 * one_layer, ttl_s=60)
    old, new = board.open("old", TOKENS), board.open("new", TOKENS)
    board.put(old, layer(0))
    board.put(old, layer(1))
    board.put(new, layer(0))
    board.put(new, layer(1))  # over capacity: the old entry goes
    assert len(board) == 1 and board.held_bytes == 2 * one_layer and board.num_dropped == 1
    with pytest.raises(HandoffError, match="unknown"):
        board.take("old", prompt_digest(TOKENS), 4, wait_s=0)
    with pytest.raises(HandoffError, match="make room"):
        list(old.read(timeout_s=1))
    huge = board.open("huge", TOKENS)
    board.discard(new, "done with it")
    board.put(huge, layer(0, num_tokens=16))  # alone larger than the board
    assert huge.done and len(board) == 0


def test_entries_expire_after_their_ttl() -> None:
    now = [0.0]
    board = HandoffBoard(1 << 20, ttl_s=5, clock=lambda: now[0])
    entry = board.open("h1", TOKENS)
    now[0] = 6.0
    board.open("h2", TOKENS)  # every open and take sweeps expired entries
    assert len(board) == 1 and entry.done
    with pytest.raises(HandoffError, match="unknown"):
        board.take("h1", prompt_digest(TOKENS), 4, wait_s=0)
