"""Membership pushed by the controller: with three cache servers, one leaving makes only the
keys it owned miss (rendezvous placement), and the worker dials a server that joins."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from prefill_helpers import MakeServer, poll, split
from rag_prompt import QUESTION, SYSTEM

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from controller.config import ControllerConfig
from controller.server import ControllerServer
from kvfuse.client.prefill import PrefillClient
from kvfuse.control.policy import CacheMember
from kvfuse.engine import Engine
from kvfuse.prefill import PrefillRequest, PrefillResult
from kvfuse.prefill.sources import Shards

DOCS = [f"Note {i}: the meeting room {i} is on floor {i % 5} of the east wing." for i in range(12)]


@pytest.fixture
def caches() -> Iterator[list[CacheServer]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(CacheServer(CacheServerConfig(port=0, metrics_port=None)))
            for _ in range(3)
        ]


def _prefill(address: str, request: PrefillRequest) -> PrefillResult:
    with PrefillClient(address) as client:
        return split(list(client.prefill(request)))[1]


def test_departed_server_loses_only_its_keys(
    engine: Engine, make_server: MakeServer, caches: list[CacheServer]
) -> None:
    addrs = tuple(c.address for c in caches)
    config = ControllerConfig(port=0, metrics_port=None, cache_addrs=addrs, refresh_s=0.05)
    with ControllerServer(config) as controller:
        worker = make_server(engine, controller=controller.address, report_interval_s=0.05)
        poll(lambda: worker.pipeline.shards.names == tuple(sorted(addrs)), 30, "3 shards")
        prompt = engine.prepare([SYSTEM, *DOCS, QUESTION])
        # a ratio of its own: the controller's ratio policy could otherwise compute these
        # short chunks in place (loads slower than compute on a busy box), and hits are
        # what this test counts
        request = PrefillRequest("shards", prompt.segments, recompute_ratio=0.15)
        assert _prefill(worker.address, request).stats.num_chunk_hits == 0
        assert worker.writer.wait_idle(120)
        assert _prefill(worker.address, request).stats.num_chunk_hits == len(DOCS)

        old = Shards([object()] * 3, sorted(addrs))  # type: ignore[list-item]
        leaving = caches[0].address
        owned = {k for k in prompt.chunk_keys if old.names[old.owner(k)] == leaving}
        assert 0 < len(owned) < len(DOCS)  # the test needs keys on both sides
        controller.board.set_members([CacheMember(a, a) for a in addrs if a != leaving])
        poll(lambda: leaving not in worker.pipeline.shards.names, 30, "2 shards")
        after = _prefill(worker.address, request).stats
        assert after.num_chunk_hits == len(DOCS) - len(owned)

        assert worker.writer.wait_idle(120)  # the misses were stored on their new owners
        assert _prefill(worker.address, request).stats.num_chunk_hits == len(DOCS)
        controller.board.set_members([CacheMember(a, a) for a in addrs])  # it comes back
        poll(lambda: len(worker.pipeline.shards.names) == 3, 30, "3 shards again")
        assert _prefill(worker.address, request).stats.num_chunk_hits == len(DOCS)
