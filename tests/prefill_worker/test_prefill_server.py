"""PrefillServer on 127.0.0.1 with PrefillClient: streaming, auth, health, errors, cancel."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prefill_helpers import (
    MakeServer,
    TestSource,
    assert_layers_equal,
    make_request,
    poll,
    sample,
    split,
)

from kvfuse.blend import FusedLayer
from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.errors import (
    AuthError,
    InvalidRequestError,
    PromptTooLongError,
    ServiceUnavailableError,
)
from kvfuse.v1 import prefill_pb2, prefill_pb2_grpc

TOKEN = "s3cret-token"


def test_streamed_layers_equal_engine_prefill(warm_engine: Engine, make_server: MakeServer) -> None:
    server = make_server(warm_engine)  # no cache servers: the engine's own store
    request = make_request(warm_engine, ratio=0.3)
    with PrefillClient(server.address) as client:
        layers, result = split(list(client.prefill(request)))
    ref_layers, ref_result = split(list(warm_engine.prefill(request)))
    assert_layers_equal(layers, ref_layers)
    assert result.first_token_id == ref_result.first_token_id
    assert result.stats.num_chunk_hits == 3 and result.stats.fallback == ""
    poll(lambda: sample(server, "kvfuse_prefill_requests_total", code="OK") == 1)
    assert sample(server, "kvfuse_prefill_recompute_ratio_count") == 1
    body = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert "kvfuse_prefill_sent_bytes_total" in body and "kvfuse_prefill_layer_load_seconds" in body


def test_auth_health_and_reflection(warm_engine: Engine, make_server: MakeServer) -> None:
    server = make_server(warm_engine, auth_token=TOKEN)
    request = make_request(warm_engine)
    for token in (None, "wrong"):
        with PrefillClient(server.address, token=token) as client, pytest.raises(AuthError):
            list(client.prefill(request))
    with PrefillClient(server.address, token=TOKEN) as client:
        assert len(list(client.prefill(request))) == 31
    with grpc.insecure_channel(server.address) as channel:  # probes need no token
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kvfuse.v1.PrefillService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = reflect.ServerReflectionInfo(iter([ask]))
        names = {s.name for s in answer.list_services_response.service}
        assert "kvfuse.v1.PrefillService" in names


def test_bad_input_is_invalid_argument_with_a_message(
    engine: Engine, make_server: MakeServer
) -> None:
    server = make_server(engine)
    with grpc.insecure_channel(server.address) as channel:
        stub = prefill_pb2_grpc.PrefillServiceStub(channel)  # type: ignore[no-untyped-call]
        bad = prefill_pb2.PrefillRequest(prefix_ids=[1, 2], query_ids=[])
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Prefill(bad))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "query" in info.value.details()
    request = make_request(engine)
    too_long = replace(request, segments=replace(request.segments, query_ids=(1,) * 9000))
    with PrefillClient(server.address) as client:
        with pytest.raises(PromptTooLongError) as too_long_info:
            list(client.prefill(too_long))
        assert too_long_info.value.max_tokens == engine.compute.max_context_tokens
        with pytest.raises(InvalidRequestError, match="recompute_ratio"):
            list(client.prefill(replace(request, recompute_ratio=2.0)))
    poll(lambda: sample(server, "kvfuse_prefill_requests_total", code="INVALID_ARGUMENT") == 3)


def test_closing_the_client_iterator_stops_the_server(
    warm_engine: Engine, make_server: MakeServer
) -> None:
    source = TestSource(warm_engine.store, hold_at=3)
    server = make_server(warm_engine, sources=[source])
    with PrefillClient(server.address) as client:
        stream = client.prefill(make_request(warm_engine))
        received = [next(stream) for _ in range(3)]
        assert [x.layer_idx for x in received if isinstance(x, FusedLayer)] == [0, 1, 2]
        stream.close()  # cancels the RPC
    poll(lambda: sample(server, "kvfuse_prefill_requests_total", code="CANCELLED") == 1)
    poll(lambda: server.pipeline.compute_lock.acquire(blocking=False), what="compute to stop")
    server.pipeline.compute_lock.release()
    assert sample(server, "kvfuse_prefill_layers_computed_total") == 3  # of 30
    assert sample(server, "kvfuse_prefill_requests_in_flight") == 0
    source.release.set()
    poll(source.closed.is_set, what="the fetch stream to close")
    assert source.sent_layers[-1] == 3


def test_client_deadline_is_service_unavailable_and_stops_the_server(
    warm_engine: Engine, make_server: MakeServer
) -> None:
    source = TestSource(warm_engine.store, hold_at=0)
    server = make_server(warm_engine, sources=[source])
    client = PrefillClient(server.address, timeout_s=0.5)
    with client, pytest.raises(ServiceUnavailableError, match="DEADLINE_EXCEEDED"):
        list(client.prefill(make_request(warm_engine)))
    poll(lambda: sample(server, "kvfuse_prefill_requests_in_flight") == 0)
    source.release.set()
    assert sample(server, "kvfuse_prefill_layers_computed_total") == 0


def test_unreachable_worker_is_service_unavailable(engine: Engine) -> None:
    client = PrefillClient("127.0.0.1:1", timeout_s=10)
    with client, pytest.raises(ServiceUnavailableError, match="UNAVAILABLE"):
        list(client.prefill(make_request(engine)))


def test_tls_to_callers_and_to_a_tls_cache_server(
    engine: Engine, make_server: MakeServer, tls_files: tuple[Path, Path]
) -> None:
    from cache_server.config import CacheServerConfig
    from cache_server.server import CacheServer

    cert, key = tls_files
    cache_config = CacheServerConfig(
        port=0, metrics_port=None, auth_token="cache", tls_cert=cert, tls_key=key
    )
    with CacheServer(cache_config) as cache:
        server = make_server(
            engine,
            cache_addrs=(cache.address,),
            cache_token="cache",
            cache_tls_ca=cert,
            tls_cert=cert,
            tls_key=key,
            auth_token=TOKEN,
        )
        request = make_request(engine)
        with PrefillClient(server.address, token=TOKEN, tls_root_cert=cert) as client:
            _, cold = split(list(client.prefill(request)))
            assert cold.stats.num_chunk_hits == 0 and cold.stats.fallback == ""
            assert server.writer.wait_idle(120)
            _, warm = split(list(client.prefill(request)))
            assert warm.stats.num_chunk_hits == 3 and warm.stats.fallback == ""
        assert sample(server, "kvfuse_prefill_write_behind_stored_total") == 4
        plain = PrefillClient(server.address, token=TOKEN, timeout_s=10)
        with plain, pytest.raises(ServiceUnavailableError):
            list(plain.prefill(request))
    unauthenticated = PrefillClient(server.address, tls_root_cert=cert)
    with unauthenticated, pytest.raises(AuthError):
        list(unauthenticated.prefill(request))
    assert sample(server, "kvfuse_prefill_requests_total", code="UNAUTHENTICATED") == 1
