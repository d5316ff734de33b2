"""kvfuse.service.grpc_server and grpc_channel: health, reflection, TLS/mTLS, metrics, stop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from kvfuse.errors import ConfigError
from kvfuse.service.grpc_channel import channel_options, open_channel
from kvfuse.service.grpc_server import GrpcServer, GrpcService, address

SERVICE = "kvfuse.v1.CacheService"
LIMIT = 1 << 20


def make_server(**settings: Any) -> GrpcServer:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "num_workers": 2,
        "max_message_bytes": LIMIT,
        "thread_name_prefix": "test-grpc",
    }
    return GrpcServer(SERVICE, **(values | settings))


@pytest.fixture
def server() -> Iterator[GrpcServer]:
    srv = make_server()
    srv.start()
    yield srv
    srv.stop(0)


def check(channel: grpc.Channel, service: str = "") -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status)


def test_address_and_channel_options() -> None:
    assert address("127.0.0.1", 5) == "127.0.0.1:5" and address("::1", 5) == "[::1]:5"
    assert channel_options(7) == [
        ("grpc.max_send_message_length", 7),
        ("grpc.max_receive_message_length", 7),
    ]
    assert ("grpc.ssl_target_name_override", "cache") in channel_options(7, "cache")


def test_health_and_reflection_answer(server: GrpcServer) -> None:
    assert server.port > 0 and server.address == f"127.0.0.1:{server.port}"
    assert server.metrics_port is None
    with open_channel(server.address, max_message_bytes=LIMIT) as channel:
        for service in ("", SERVICE):
            assert check(channel, service) == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = stub.ServerReflectionInfo(iter([ask]), timeout=10)
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_metrics_endpoint_lives_and_dies_with_the_server() -> None:
    registry = CollectorRegistry()
    Counter("kvfuse_test_things", "Things.", registry=registry).inc(3)
    srv = make_server(metrics_registry=registry, metrics_port=0)
    srv.start()
    port = srv.metrics_port
    assert port
    assert "kvfuse_test_things_total 3.0" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    srv.stop(0)
    srv.stop(0)  # idempotent
    assert srv.stopped and srv.metrics_port is None and srv.wait(timeout_s=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_busy_port_and_unreadable_tls_files_are_config_errors(
    server: GrpcServer, tmp_path: Path
) -> None:
    second = make_server(port=server.port)
    with pytest.raises(ConfigError, match="cannot listen on"):
        second.start()
    second.stop(0)
    missing = make_server(tls_cert=tmp_path / "no-cert.pem", tls_key=tmp_path / "no-key.pem")
    with pytest.raises(ConfigError, match="cannot read"):
        missing.start()
    missing.stop(0)


def test_tls_and_mtls(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    tls = make_server(tls_cert=cert, tls_key=key)
    tls.start()
    try:
        with open_channel(tls.address, max_message_bytes=LIMIT, tls_root_cert=cert) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        plain = open_channel(tls.address, max_message_bytes=LIMIT)
        with plain, pytest.raises(grpc.RpcError):
            check(plain)
    finally:
        tls.stop(0)
    mtls = make_server(tls_cert=cert, tls_key=key, tls_client_ca=cert)
    mtls.start()
    try:
        pem = cert.read_bytes()  # bytes or paths alike
        with open_channel(
            mtls.address,
            max_message_bytes=LIMIT,
            tls_root_cert=pem,
            tls_client_cert=cert,
            tls_client_key=key,
            tls_server_name="localhost",
        ) as channel:
            assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        no_cert = open_channel(mtls.address, max_message_bytes=LIMIT, tls_root_cert=cert)
        with no_cert, pytest.raises(grpc.RpcError):
            check(no_cert)
    finally:
        mtls.stop(0)
    with pytest.raises(ConfigError, match="cannot read"):
        open_channel("127.0.0.1:1", max_message_bytes=LIMIT, tls_root_cert=str(cert) + ".x")


class Service(GrpcService):
    """The smallest GrpcService: counts its closes."""

    def __init__(self) -> None:
        super().__init__(make_server(), grace_s=0)
        self.num_closes = 0

    def start(self) -> Service:
        self.grpc.start()
        return self

    def close(self) -> None:
        self.num_closes += 1


def test_grpc_service_context_manager_stops_once() -> None:
    with Service() as service:
        assert service.port > 0 and service.address.endswith(f":{service.port}")
        assert service.metrics_port is None
    assert service.num_closes == 1 and service.wait(timeout_s=10)
    service.stop()
    assert service.num_closes == 1
    unstarted = Service()
    unstarted.stop()  # fine before start
    assert unstarted.num_closes == 1
