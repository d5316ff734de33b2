"""ConnectorScheduler: external token counts for hand-offs, prefix hits, partial hits and
misses; the loads and saves it plans; a failed load never retried."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvfuse.connector.plan import BlockLayout, HandoffParams
from kvfuse.connector.scheduler import ConnectorScheduler
from kvfuse.errors import ServiceUnavailableError

BS = 4  # block size
LAYOUT = BlockLayout("m", "float32", BS, 2, 1, 8)
PROMPT = list(range(100, 114))  # 14 tokens: 3 full blocks + 2
HASHES = [bytes([i]) * 32 for i in range(3)]
HANDOFF = HandoffParams("h1", "10.0.0.7:50052")


class Store:
    """The prefix store's lookup: keys stored, calls counted, failing on demand."""

    def __init__(self, num_stored_blocks: int, down: bool = False) -> None:
        self.stored = {LAYOUT.key(h) for h in HASHES[:num_stored_blocks]}
        self.down, self.num_calls = down, 0

    def lookup(self, keys: Sequence[str]) -> set[str]:
        self.num_calls += 1
        if self.down:
            raise ServiceUnavailableError("cache down")
        return self.stored & set(keys)


def test_a_handoff_claims_every_token_after_the_local_hit() -> None:
    sched = ConnectorScheduler(LAYOUT, Store(3).lookup, save=True)
    params = HANDOFF.to_params()
    assert sched.num_matched("r1", PROMPT, HASHES, params, num_computed=0) == (14, True)
    assert sched.num_matched("r2", PROMPT, HASHES, params, num_computed=8) == (6, True)
    sched.allocated("r2", [7, 8, 9, 10], 6)
    (load,) = sched.plan({}, lambda _: []).fused_loads
    assert (load.start, load.end, load.block_ids, load.handoff) == (8, 14, (7, 8, 9, 10), HANDOFF)
    assert load.token_ids == tuple(PROMPT)


def test_a_layerwise_handoff_joins_the_step_without_its_last_token() -> None:
    sched = ConnectorScheduler(LAYOUT, None, save=False, layerwise=True)
    params = HANDOFF.to_params()
    assert sched.num_matched("r", PROMPT, HASHES, params, num_computed=0) == (13, False)
    sched.allocated("r", [7, 8, 9, 10], 13)
    (load,) = sched.plan({}, lambda _: []).fused_loads
    assert (load.start, load.end, load.layerwise) == (0, 13, True)
    assert sched.num_matched("p", PROMPT, HASHES, None, 0) == (0, False)  # prefix: async only


@pytest.mark.parametrize(
    ("num_stored", "num_local", "expected"),
    [
        (3, 0, 12),  # every full block stored: the partial last block is computed
        (2, 0, 8),  # a partial hit: the run of stored blocks
        (0, 0, 0),  # a miss
        (3, 4, 8),  # after vLLM's own one-block hit
        (1, 4, 0),  # the store holds only what vLLM already has
        (3, 12, 0),  # vLLM has every full block
    ],
)
def test_prefix_store_counts(num_stored: int, num_local: int, expected: int) -> None:
    sched = ConnectorScheduler(LAYOUT, Store(num_stored).lookup, save=True)
    assert sched.num_matched("r", PROMPT, HASHES, None, num_local) == (expected, expected > 0)


def test_only_the_first_run_of_stored_blocks_counts() -> None:
    store = Store(3)
    store.stored.discard(LAYOUT.key(HASHES[1]))  # block 1 evicted, block 2 still there
    sched = ConnectorScheduler(LAYOUT, store.lookup, save=True)
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (4, True)


def test_prefix_hits_plan_block_loads_into_the_allocated_blocks() -> None:
    sched = ConnectorScheduler(LAYOUT, Store(3).lookup, save=True)
    assert sched.num_matched("r", PROMPT, HASHES, None, num_computed=4) == (8, True)
    sched.allocated("r", [20, 21, 22, 23], 8)  # block 20 is vLLM's own hit
    (load,) = sched.plan({}, lambda _: []).block_loads
    assert load.block_ids == (21, 22)
    assert load.keys == (LAYOUT.key(HASHES[1]), LAYOUT.key(HASHES[2]))
    assert not sched.plan({}, lambda _: [])  # planned once


def test_a_down_cache_is_a_miss_and_no_prefix_store_means_no_lookup() -> None:
    sched = ConnectorScheduler(LAYOUT, Store(3, down=True).lookup, save=True)
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (0, False)
    no_store = ConnectorScheduler(LAYOUT, None, save=True)
    assert no_store.num_matched("r", PROMPT, HASHES, None, 0) == (0, False)


def test_a_load_is_tried_once() -> None:
    store = Store(3)
    sched = ConnectorScheduler(LAYOUT, store.lookup, save=True)
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (12, True)
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (12, True)  # not allocated yet
    sched.allocated("r", [1, 2, 3, 4], 12)
    # vLLM asks again only after a failed load reset the request: it computes it now
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (0, False)
    sched.allocated("r", [1, 2, 3, 4], 0)
    assert len(sched.plan({}, lambda _: []).block_loads) == 1  # the first allocation's only
    handoff = ConnectorScheduler(LAYOUT, None, save=False)
    assert handoff.num_matched("h", PROMPT, HASHES, HANDOFF.to_params(), 0) == (14, True)
    handoff.allocated("h", [1, 2, 3, 4], 14)
    assert handoff.num_matched("h", PROMPT, HASHES, HANDOFF.to_params(), 0) == (0, False)


def test_saves_follow_the_blocks_each_step_completes() -> None:
    sched = ConnectorScheduler(LAYOUT, Store(1).lookup, save=True)
    blocks = {"r": [30, 31, 32, 33]}
    assert sched.num_matched("r", PROMPT, HASHES, None, 0) == (4, True)  # block 0 is stored
    sched.allocated("r", blocks["r"], 4)
    sched.plan({}, blocks.__getitem__)  # the load's step
    # chunked prefill: tokens 4..9 this step, 10..13 the next
    (save,) = sched.plan({"r": (4, 6)}, blocks.__getitem__).saves
    assert save.block_ids == (31,) and save.keys == (LAYOUT.key(HASHES[1]),)
    (save,) = sched.plan({"r": (10, 4)}, blocks.__getitem__).saves
    assert save.block_ids == (32,)  # the partial last block is never stored
    assert not sched.plan({"r": (14, 1)}, blocks.__getitem__).saves  # decoding adds none
    sched.finished("r")
    assert sched.num_tracked == 0


def test_blended_and_read_only_requests_are_never_saved() -> None:
    sched = ConnectorScheduler(LAYOUT, Store(0).lookup, save=True)
    sched.num_matched("h", PROMPT, HASHES, HANDOFF.to_params(), 0)
    sched.allocated("h", [1, 2, 3, 4], 14)
    assert not sched.plan({"h": (0, 14)}, lambda _: [1, 2, 3, 4]).saves
    read_only = ConnectorScheduler(LAYOUT, Store(0).lookup, save=False)
    read_only.num_matched("r", PROMPT, HASHES, None, 0)
    read_only.allocated("r", [1, 2, 3, 4], 0)
    assert not read_only.plan({"r": (0, 14)}, lambda _: [1, 2, 3, 4]).saves
