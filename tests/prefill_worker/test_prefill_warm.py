"""Warm over gRPC: the prefill worker stores a prompt's chunks before any request reads them."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
import torch
from prefill_helpers import (
    DOCS,
    QUESTION,
    SYSTEM,
    MakeServer,
    TestSource,
    make_request,
    sample,
    split,
)

from kvfuse.chunk_store import ChunkStore
from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.errors import AuthError, InvalidRequestError, ServiceUnavailableError
from kvfuse.kv import ChunkKV
from kvfuse.segments import PromptSegments
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc


class FailingPuts(TestSource):
    """Holds nothing new: every put fails as an unreachable cache would."""

    def put(self, key: str, kv: ChunkKV) -> bool:
        self.num_puts += 1
        raise ServiceUnavailableError("UNAVAILABLE: injected put failure")


def warm_segments(engine: Engine, docs: Sequence[str] = DOCS) -> PromptSegments:
    seg = engine.prepare([SYSTEM, *docs, QUESTION]).segments
    return PromptSegments(seg.prefix_ids, seg.chunk_ids, ())


def test_warm_stores_what_a_request_would_and_the_next_request_hits(
    engine: Engine, make_server: MakeServer, warm_objects: dict[str, ChunkKV]
) -> None:
    source = TestSource(ChunkStore(1 << 30))
    server = make_server(engine, sources=[source])
    with PrefillClient(server.address) as client:
        result = client.warm_chunks(warm_segments(engine), request_id="ingest-1")
        assert (result.num_objects, result.num_present, result.num_stored) == (4, 0, 4)
        assert result.num_failed == 0 and result.num_computed_tokens > 0
        for key, kv in warm_objects.items():  # the test prompt's objects, computed by the engine
            stored = source.inner.store.get(key)
            assert stored is not None and torch.equal(stored.k, kv.k)
            assert torch.equal(stored.v, kv.v)
        again = client.warm_chunks(warm_segments(engine, DOCS[::-1]))
        assert (again.num_present, again.num_stored, again.num_computed_tokens) == (4, 0, 0)
        _, prefilled = split(list(client.prefill(make_request(engine, DOCS[::-1]))))
    assert prefilled.stats.num_chunk_hits == 3 and prefilled.stats.num_chunks_precomputed == 0
    assert sample(server, "kvfuse_prefill_warm_objects_total", result="stored") == 4
    assert sample(server, "kvfuse_prefill_warm_objects_total", result="present") == 4


def test_failed_stores_are_counted_and_a_failed_lookup_computes(
    engine: Engine, make_server: MakeServer
) -> None:
    failing = FailingPuts(ChunkStore(1 << 30))
    blind = TestSource(ChunkStore(1 << 30), lookup_error=ServiceUnavailableError("UNAVAILABLE"))
    with PrefillClient(make_server(engine, sources=[failing]).address) as client:
        result = client.warm_chunks(warm_segments(engine))
    assert (result.num_failed, result.num_stored, failing.num_puts) == (4, 0, 4)
    with PrefillClient(make_server(engine, sources=[blind]).address) as client:
        result = client.warm_chunks(warm_segments(engine))
    assert (result.num_stored, blind.num_puts) == (4, 4)  # the store still took them


def test_warm_bad_input_and_auth(engine: Engine, make_server: MakeServer) -> None:
    server = make_server(engine, auth_token="warm-token")
    with PrefillClient(server.address, token="wrong") as client, pytest.raises(AuthError):
        client.warm_chunks(warm_segments(engine))
    with PrefillClient(server.address, token="warm-token") as client:
        with pytest.raises(InvalidRequestError, match="warm 1 to 256 chunks"):
            client.warm_chunks(PromptSegments((1,), (), ()))
        with pytest.raises(InvalidRequestError, match="request_id"):
            client.warm_chunks(warm_segments(engine), request_id="x" * 300)
        with pytest.raises(InvalidRequestError, match="chunk 0 is empty"):
            client.warm_chunks(PromptSegments((1,), ((),), ()))
    with grpc.insecure_channel(server.address) as channel:  # a raw caller sees the status
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)  # type: ignore[no-untyped-call]
        bad = prefill_pb2.WarmRequest(chunks=[prefill_pb2.TokenSegment(token_ids=[10**6])])
        with pytest.raises(grpc.RpcError) as info:
            stub.Warm(bad, metadata=[("authorization", "Bearer warm-token")])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token ids" in (info.value.details() or "")
