"""ConnectorWorker against real servers on 127.0.0.1: a hand-off taken from a prefill worker
lands in the paged KV bit for bit; blocks saved to a cache server load back into other blocks;
failed loads are reported, never raised."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from prefill_helpers import make_request, split
from test_paged import column_major_write

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.blend import Mode
from kvfuse.client.prefill import PrefillClient
from kvfuse.connector.config import ConnectorConfig
from kvfuse.connector.paged import PagedKV
from kvfuse.connector.plan import (
    BlockLayout,
    BlockLoad,
    BlockSave,
    FusedLoad,
    HandoffParams,
    StepPlan,
)
from kvfuse.connector.worker import ConnectorWorker, PrefillClients
from kvfuse.engine import Engine
from kvfuse.prefill.sources import CacheServerSource, Shards, StoreSource
from prefill_worker.config import PrefillConfig
from prefill_worker.server import PrefillServer

BS = 16
LAYOUT = BlockLayout("smollm2", "float32", BS, 30, 3, 64)


def paged_kv(num_blocks: int) -> PagedKV:
    caches = [torch.zeros(num_blocks, 3, BS, 128) for _ in range(30)]
    return PagedKV.probe(caches, column_major_write)


def wait_results(worker: ConnectorWorker, num: int) -> tuple[set[str], set[str]]:
    done: set[str] = set()
    failed: set[str] = set()
    deadline = time.monotonic() + 60
    while len(done) < num and time.monotonic() < deadline:
        new_done, new_failed = worker.results(wait_s=0.1)
        done |= new_done
        failed |= new_failed
    return done, failed


@pytest.fixture
def prefill_server(engine: Engine) -> Iterator[PrefillServer]:
    config = PrefillConfig(port=0, metrics_port=None, miss_policy=engine.miss_policy)
    server = PrefillServer(config, compute=engine.compute, sources=[StoreSource(engine.store)])
    yield server.start()
    server.stop(grace_s=0)


@pytest.fixture
def shards() -> Iterator[Shards]:
    settings = {"port": 0, "metrics_port": None, "memory_bytes": "256MiB", "grace_s": 0}
    with CacheServer(CacheServerConfig.from_mapping(settings)) as server:
        shards = Shards([CacheServerSource(server.address, None, 5, 5, 5)], ["cache-0"])
        yield shards
        shards.close()


def test_a_handoff_lands_in_the_paged_kv(engine: Engine, prefill_server: PrefillServer) -> None:
    request = make_request(engine, mode=Mode.FULL_PREFILL)
    token_ids = tuple(request.segments.token_ids)
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // BS)
    block_ids = tuple(range(num_blocks + 2, 1, -1))[:num_blocks]  # scattered, reversed
    with PrefillClient(prefill_server.address) as client:
        ref_layers, _ = split(list(client.prefill(request)))
        clients = PrefillClients(ConnectorConfig())
        worker = ConnectorWorker(ConnectorConfig(), None, clients.take_fused)
        worker.register(paged := paged_kv(num_blocks + 3))
        handoff = client.hand_off(replace(request, handoff_id="h-1"))
        address = next(handoff)
        assert isinstance(address, str)
        rest = threading.Thread(target=lambda: list(handoff))
        rest.start()
        load = FusedLoad("r1", HandoffParams("h-1", address), token_ids, 0, num_tokens, block_ids)
        worker.start(StepPlan(fused_loads=[load]))
        assert wait_results(worker, 1) == ({"r1"}, set())
        rest.join(30)
        missing = FusedLoad(
            "r2", HandoffParams("nope", address), token_ids, 0, num_tokens, block_ids
        )
        worker.start(StepPlan(fused_loads=[missing]))
        assert wait_results(worker, 1) == ({"r2"}, {"r2"})
        worker.close()
        clients.close()
    for layer in ref_layers:
        k, v = paged.unpack(paged.copy_blocks(block_ids)[layer.layer_idx])  # [n, BS, H, D]
        got_k = k.reshape(-1, 3, 64)[:num_tokens].transpose(0, 1)
        got_v = v.reshape(-1, 3, 64)[:num_tokens].transpose(0, 1)
        assert torch.equal(got_k, layer.k) and torch.equal(got_v, layer.v), layer.layer_idx


def test_saved_blocks_load_back_into_other_blocks(shards: Shards) -> None:
    paged = paged_kv(8)
    for cache in paged.caches:
        cache.copy_(torch.randn_like(cache))
    keys = tuple(LAYOUT.key(bytes([i]) * 32) for i in range(3))
    worker = ConnectorWorker(ConnectorConfig(), shards, lambda *args: iter(()))
    worker.register(paged)
    worker.save(StepPlan(saves=[BlockSave("r1", keys, (5, 1, 6))]))
    deadline = time.monotonic() + 30
    while len(shards.sources[0].lookup(list(keys))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = [cache.clone() for cache in paged.caches]
    worker.start(StepPlan(block_loads=[BlockLoad("r2", keys, (0, 2, 3))]))
    assert wait_results(worker, 1) == ({"r2"}, set())
    for cache, old in zip(paged.caches, before, strict=True):
        assert torch.equal(cache[[0, 2, 3]], old[[5, 1, 6]])  # the same bytes, other blocks
        assert torch.equal(cache[[1, 4, 5, 6, 7]], old[[1, 4, 5, 6, 7]])  # nothing else moved
    unknown = (LAYOUT.key(b"\xff" * 32),)
    worker.start(StepPlan(block_loads=[BlockLoad("r3", unknown, (4,))]))
    assert wait_results(worker, 1) == ({"r3"}, {"r3"})
    worker.close()


def test_a_layerwise_load_gates_each_layer(engine: Engine, prefill_server: PrefillServer) -> None:
    request = make_request(engine, mode=Mode.FULL_PREFILL)
    token_ids = tuple(request.segments.token_ids)
    num = len(token_ids) - 1  # vLLM computes the last token in the step
    block_ids = tuple(range(-(-num // BS)))
    paged = paged_kv(len(block_ids))
    with PrefillClient(prefill_server.address) as client:
        ref_layers, _ = split(list(client.prefill(request)))
        clients = PrefillClients(ConnectorConfig())
        worker = ConnectorWorker(ConnectorConfig(load_deadline_s=30), None, clients.take_fused)
        worker.register(paged)
        handoff = client.hand_off(replace(request, handoff_id="h-lw"))
        params = HandoffParams("h-lw", str(next(handoff)))
        rest = threading.Thread(target=lambda: list(handoff))
        rest.start()
        load = FusedLoad("r1", params, token_ids, 0, num, block_ids, layerwise=True)
        worker.start(StepPlan(fused_loads=[load]))
        for layer in ref_layers:  # as vLLM's attention layers do, in order
            worker.wait_layer(layer.layer_idx)
            k, _ = paged.unpack(paged.copy_blocks(block_ids)[layer.layer_idx])
            assert torch.equal(k.reshape(-1, 3, 64)[:num].transpose(0, 1), layer.k[:, :num])
        rest.join(30)
        assert worker.error_blocks() == set() and worker.results() == (set(), set())
        gone = replace(load, handoff=HandoffParams("gone", params.address))
        worker.start(StepPlan(fused_loads=[gone]))
        worker.wait_layer(0)
        assert worker.error_blocks() == set(block_ids)  # vLLM recomputes them
        worker.close()
        clients.close()
