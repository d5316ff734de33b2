"""kvfuse.service.auth: tokens → tenants, token files, the interceptor on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvfuse.errors import AuthError, ConfigError
from kvfuse.service.auth import (
    Authenticator,
    AuthInterceptor,
    bearer_metadata,
    check_tenants,
    merge_tokens,
    parse_tokens_map,
    read_tokens_file,
)
from kvfuse.service.grpc_channel import open_channel
from kvfuse.service.grpc_server import GrpcServer

AUTH = Authenticator({"tok-a": "team-a", "tok-b": "team-b"})


def test_no_tokens_means_everyone_is_default() -> None:
    assert not Authenticator({}).enabled
    assert Authenticator({}).tenant_of(None) == "default"


@pytest.mark.parametrize(
    ("value", "tenant"),
    [("Bearer tok-a", "team-a"), ("bearer tok-b", "team-b"), (b"Bearer  tok-a ", "team-a")],
)
def test_valid_tokens_pick_their_tenant(value: str | bytes, tenant: str) -> None:
    assert AUTH.tenant_of([("user-agent", "x"), ("authorization", value)]) == tenant


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "tok-a")],
        [("authorization", "Basic tok-a")],
        [("authorization", "Bearer ")],
        [("authorization", "Bearer tok-c")],
        [("authorization", "Bearer tok-a"), ("authorization", "Bearer tok-b")],
    ],
)
def test_missing_or_wrong_tokens_raise(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(AuthError):
        AUTH.tenant_of(metadata)


def test_bearer_metadata_round_trips() -> None:
    assert bearer_metadata(None) == () and bearer_metadata("") == ()
    assert AUTH.tenant_of(bearer_metadata("tok-b")) == "team-b"


def test_token_sources_merge(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# tenant token\nteam-a tok-a\n\nteam-b tok-b\n")
    assert read_tokens_file(tokens_file) == {"tok-a": "team-a", "tok-b": "team-b"}
    merged = merge_tokens({"tok-c": "team-c", "tok-a": "old"}, tokens_file, "tok-0")
    assert merged == {"tok-c": "team-c", "tok-a": "team-a", "tok-b": "team-b", "tok-0": "default"}
    assert merge_tokens({}, None, None) == {}


def test_bad_token_sources_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "tokens"
    for text in ("only-one-field\n", "Bad_Tenant tok\n", "a b c\n"):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=r"tokens:1: expected"):
            read_tokens_file(bad)
    with pytest.raises(ConfigError, match="cannot read tokens file"):
        read_tokens_file(tmp_path / "missing")
    with pytest.raises(ConfigError, match="mapping"):
        parse_tokens_map(["tok"])
    assert parse_tokens_map({"tok": "team"}) == {"tok": "team"}
    with pytest.raises(ConfigError, match="must match"):
        check_tenants({"tok": "Bad Tenant"})


@pytest.fixture
def guarded() -> Iterator[tuple[GrpcServer, list[int]]]:
    """A server whose health service is guarded by the interceptor; counts denials."""
    denied: list[int] = []
    interceptor = AuthInterceptor(
        Authenticator({"secret": "team"}), "/grpc.health.v1.Health/", lambda: denied.append(1)
    )
    server = GrpcServer(
        "test.Service",
        host="127.0.0.1",
        port=0,
        num_workers=2,
        max_message_bytes=1 << 20,
        thread_name_prefix="test-auth",
        interceptors=[interceptor],
    )
    server.start()
    yield server, denied
    server.stop(0)


def test_interceptor_refuses_unary_and_streaming_calls(
    guarded: tuple[GrpcServer, list[int]],
) -> None:
    server, denied = guarded
    request = health_pb2.HealthCheckRequest(service="")
    with open_channel(server.address, max_message_bytes=1 << 20) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for metadata in ((), bearer_metadata("wrong")):
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(request, timeout=10, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "invalid bearer token" in info.value.details()
        with pytest.raises(grpc.RpcError) as stream_info:  # a server-streaming method
            next(iter(stub.Watch(request, timeout=10)))
        assert stream_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.Check(request, timeout=10, metadata=bearer_metadata("secret"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert len(denied) == 3


def test_interceptor_is_off_without_tokens() -> None:
    interceptor = AuthInterceptor(Authenticator({}), "/grpc.health.v1.Health/")
    server = GrpcServer(
        "test.Service",
        host="127.0.0.1",
        port=0,
        num_workers=1,
        max_message_bytes=1 << 20,
        thread_name_prefix="test-auth",
        interceptors=[interceptor],
    )
    server.start()
    try:
        with open_channel(server.address, max_message_bytes=1 << 20) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="test.Service"), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
