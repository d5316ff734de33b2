"""Hand-off prefills on a real PrefillServer: the layers a taker gets equal a streamed prefill's;
wrong tokens, unknown ids and a second take are refused with FAILED_PRECONDITION."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from prefill_helpers import MakeServer, assert_layers_equal, make_request, split

from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.errors import HandoffError, InvalidRequestError
from kvfuse.prefill import PrefillResult


def test_taken_layers_equal_a_streamed_prefill(
    warm_engine: Engine, make_server: MakeServer
) -> None:
    server = make_server(warm_engine, advertise_address="10.1.2.3:50052")
    request = make_request(warm_engine, ratio=0.3)
    token_ids = request.segments.token_ids
    with PrefillClient(server.address) as client:
        ref_layers, ref_result = split(list(client.prefill(request)))
        taken: list[object] = []
        taker = threading.Thread(  # the taker starts first: it waits for the prefill
            target=lambda: taken.extend(client.take_fused("h-1", token_ids, wait_s=30))
        )
        taker.start()
        address, result = client.hand_off(replace(request, handoff_id="h-1"))
        taker.join(60)
    assert address == "10.1.2.3:50052"
    assert isinstance(result, PrefillResult) and result.first_token_id == ref_result.first_token_id
    layers, taken_result = split(taken)  # type: ignore[arg-type]
    assert_layers_equal(layers, ref_layers)
    assert taken_result.stats.num_chunk_hits == result.stats.num_chunk_hits == 3
    assert len(server.handoffs) == 0


def test_takes_that_must_fail(warm_engine: Engine, make_server: MakeServer) -> None:
    server = make_server(warm_engine)
    request = replace(make_request(warm_engine), handoff_id="h-2")
    token_ids = request.segments.token_ids
    with PrefillClient(server.address) as client:
        address, _result = client.hand_off(request)
        assert address == server.address  # the listen address unless one is advertised
        with pytest.raises(HandoffError, match="other tokens"):
            list(client.take_fused("h-2", token_ids[:-1], wait_s=1))
        with pytest.raises(HandoffError, match="unknown, taken or expired"):
            list(client.take_fused("h-2", token_ids, wait_s=0.1))  # spent by the wrong take
        with pytest.raises(HandoffError, match="unknown"):
            list(client.take_fused("never", token_ids, wait_s=0.1))
        with pytest.raises(InvalidRequestError, match="hand_off"):
            list(client.prefill(request))
        list(client.hand_off(replace(request, handoff_id="h-3")))
        with pytest.raises(InvalidRequestError, match="already in use"):
            list(client.hand_off(replace(request, handoff_id="h-3")))
