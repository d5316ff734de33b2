"""vLLM's scheduler with KVFuseConnector loaded by module path: external token counts for
hand-offs, prefix hits, partial hits and misses; saves planned; a failed load recomputed."""

from __future__ import annotations

from typing import Any

import torch
from conftest import BLOCK_SIZE, MODEL_ID, MakeScheduler
from vllm import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from kvfuse.client import CacheClient
from kvfuse.connector.plan import BlockLayout, HandoffParams, StepPlan

PROMPT = list(range(1000, 1050))  # 50 tokens: 3 full blocks of 16, then 2
LAYOUT = BlockLayout(MODEL_ID, "float32", BLOCK_SIZE, 30, 3, 64)


def request(request_id: str, params: dict[str, Any] | None = None) -> Request:
    init_none_hash(sha256)
    extra = {"kv_transfer_params": params} if params else None
    sampling = SamplingParams(max_tokens=4, extra_args=extra)
    hasher = get_request_block_hasher(BLOCK_SIZE, sha256)
    return Request(request_id, list(PROMPT), sampling, None, block_hasher=hasher)


def schedule(scheduler: Scheduler, req: Request) -> StepPlan:
    scheduler.add_request(req)
    output = scheduler.schedule()
    scheduler.last_output = output
    plan: StepPlan = output.kv_connector_metadata.plan
    return plan


def store_blocks(address: str, req: Request, num_blocks: int) -> None:
    layer = (torch.zeros(BLOCK_SIZE, 3, 64), torch.zeros(BLOCK_SIZE, 3, 64))
    with CacheClient(address) as client:
        for block_hash in req.block_hashes[:num_blocks]:
            assert client.put(LAYOUT.key(block_hash), [layer] * 30).stored


def test_a_handoff_claims_the_whole_prompt(make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler({})
    params = HandoffParams("h1", "127.0.0.1:50052")
    req = request("r1", params.to_params())
    plan = schedule(scheduler, req)
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert req.num_computed_tokens == len(PROMPT)
    (load,) = plan.fused_loads
    assert load.handoff == params and (load.start, load.end) == (0, len(PROMPT))
    assert load.block_ids == tuple(scheduler.kv_cache_manager.get_block_ids("r1")[0])
    assert not plan.saves  # blended KV is never stored as exact prefix blocks


def test_prefix_hits_partial_hits_and_misses(
    make_scheduler: MakeScheduler, cache_address: str
) -> None:
    for num_stored, expected in ((3, 48), (1, 16), (0, 0)):
        scheduler = make_scheduler({"cache_servers": [cache_address]})
        req = request(f"r{num_stored}")
        store_blocks(cache_address, req, num_stored)
        plan = schedule(scheduler, req)
        if expected:
            assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
            assert req.num_computed_tokens == expected
            (load,) = plan.block_loads
            assert len(load.keys) == len(load.block_ids) == num_stored
        else:
            assert req.status == RequestStatus.RUNNING and not plan.block_loads
            (save,) = plan.saves  # the miss computes all 50 tokens now: 3 full blocks
            assert save.keys == tuple(LAYOUT.key(h) for h in req.block_hashes[:3])
        with CacheClient(cache_address) as client:
            client.delete([LAYOUT.key(h) for h in req.block_hashes])


def test_a_failed_load_is_computed_by_vllm(make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler({})
    req = request("r1", HandoffParams("h1", "127.0.0.1:50052").to_params())
    schedule(scheduler, req)
    failed = KVConnectorOutput(finished_recving={"r1"}, failed_recving={"r1"})
    last = scheduler.last_output
    scheduler.update_from_output(last, ModelRunnerOutput.with_kv_conn_output_only(failed))
    output = scheduler.schedule()
    assert req.status == RequestStatus.RUNNING
    assert output.num_scheduled_tokens["r1"] == len(PROMPT)  # computed from scratch
    assert not output.kv_connector_metadata.plan.fused_loads  # not tried again


def test_a_layerwise_handoff_runs_in_the_next_step(make_scheduler: MakeScheduler) -> None:
    scheduler = make_scheduler({"handoff_load": "layerwise"})
    req = request("r1", HandoffParams("h1", "127.0.0.1:50052").to_params())
    scheduler.add_request(req)
    output = scheduler.schedule()
    assert req.status == RequestStatus.RUNNING and output.has_sync_kv_loads
    assert output.num_scheduled_tokens["r1"] == 1  # vLLM computes only the last prompt token
    (load,) = output.kv_connector_metadata.plan.fused_loads
    assert load.layerwise and (load.start, load.end) == (0, len(PROMPT) - 1)
