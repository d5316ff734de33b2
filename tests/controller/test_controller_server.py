"""A real controller on 127.0.0.1: reports become a published policy, watchers receive it,
explain evaluates it, bad input and missing tokens are refused with precise codes."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prefill_helpers import poll

from controller.config import ControllerConfig
from controller.server import ControllerServer
from kvfuse.client.controller import ControllerClient
from kvfuse.control.calibration import Calibration, CurvePoint
from kvfuse.control.policy import ComputeSample, LoadSample
from kvfuse.control.ratio import ChunkShape, RequestShape
from kvfuse.errors import AuthError, InvalidRequestError
from kvfuse.prefill import Cancel
from kvfuse.v1 import controller_pb2, controller_pb2_grpc

TOKEN = "controller-secret"
SAMPLES = [ComputeSample(30, rows * 30, 30 * (0.001 + 10e-6 * rows)) for rows in (200, 900, 3000)]
DISK = LoadSample("disk", "raw", 10_000_000, 0.05)  # 5 ns/byte


@pytest.fixture
def server() -> Iterator[ControllerServer]:
    config = ControllerConfig(
        port=0,
        metrics_port=0,
        auth_token=TOKEN,
        cache_addrs=("127.0.0.1:7001", "127.0.0.1:7002"),
        refresh_s=0.05,
    )
    with ControllerServer(config) as srv:
        yield srv


@pytest.fixture
def client(server: ControllerServer) -> Iterator[ControllerClient]:
    with ControllerClient(server.address, token=TOKEN) as c:
        yield c


def test_reports_become_the_policy_watchers_receive(
    server: ControllerServer, client: ControllerClient
) -> None:
    cancel = Cancel()
    policies = client.watch("worker-0", cancel)
    first = next(policies)
    assert first.ratio.compute is None and first.ratio.r_quality == 0.15
    assert [m.address for m in first.cache_servers] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    client.report("worker-0", SAMPLES, [DISK], {"controller": 3, "request": 1})
    latest = next(policies)
    while latest.ratio.compute is None or not latest.ratio.load_s_per_byte:
        latest = next(policies)
    cancel.cancel()
    assert latest.version > first.version
    assert latest.ratio.compute.per_row_s == pytest.approx(10e-6, rel=1e-3)
    assert latest.ratio.load_s_per_byte[("disk", "raw")] == pytest.approx(5e-9)
    body = _scrape(server)
    assert 'kvfuse_controller_decisions_total{source="controller"} 3.0' in body
    assert 'kvfuse_controller_members{role="cache"} 2.0' in body
    assert "kvfuse_controller_compute_seconds" in body


def test_explain_follows_the_policy(server: ControllerServer, client: ControllerClient) -> None:
    client.report("worker-0", SAMPLES, [DISK], {})
    poll(lambda: server.board.policy.ratio.load_s_per_byte, 10, "policy with load rates")
    chunks = tuple(ChunkShape(500, 500 * 23_040, "disk", "raw") for _ in range(6))
    answer = client.explain(RequestShape(3040, 30, chunks, 40))
    assert answer.source == "controller" and answer.reason.startswith("load")
    assert 0.15 < answer.ratio <= 0.6
    assert answer.compute_s == pytest.approx(answer.load_s, rel=0.02)
    memory = client.explain(RequestShape(3040, 30, (ChunkShape(3000, 1, "memory", "raw"),), 40))
    assert memory.ratio == pytest.approx(0.15) and memory.reason.startswith("quality")


@pytest.mark.parametrize(
    "request_pb",
    [
        controller_pb2.ReportRequest(member_id=""),
        controller_pb2.ReportRequest(member_id="x" * 254),
        controller_pb2.ReportRequest(
            member_id="w", compute=[controller_pb2.ComputeSample(num_layers=0, seconds=1)]
        ),
        controller_pb2.ReportRequest(
            member_id="w", compute=[controller_pb2.ComputeSample(num_layers=1, seconds=-1)]
        ),
        controller_pb2.ReportRequest(
            member_id="w", loads=[controller_pb2.LoadSample(nbytes=1, seconds=float("nan"))]
        ),
    ],
)
def test_bad_reports_are_invalid_argument(
    server: ControllerServer, request_pb: controller_pb2.ReportRequest
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as info:
            stub.Report(request_pb, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert server.board.estimates.compute_model() is None  # nothing of it was kept


@pytest.mark.parametrize(
    "shape",
    [
        RequestShape(100, 0, (), 10),  # no layers
        RequestShape(100, 30, (ChunkShape(500, 1, "disk", "raw"),), 10),  # more than num_tokens
        RequestShape(600, 30, (ChunkShape(500, 1, "", "raw"),), 10),  # no tier
    ],
)
def test_bad_shapes_are_invalid_argument(client: ControllerClient, shape: RequestShape) -> None:
    with pytest.raises(InvalidRequestError):
        client.explain(shape)


def test_unauthenticated_calls_refused(server: ControllerServer) -> None:
    for token in (None, "wrong"):
        with ControllerClient(server.address, token=token) as anonymous:
            with pytest.raises(AuthError):
                anonymous.report("w", [], [], {})
            with pytest.raises(AuthError):
                anonymous.explain(RequestShape(10, 30, (), 10))
            with pytest.raises(AuthError):
                next(anonymous.watch("w"))


def _scrape(server: ControllerServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_cache_pods_discovered_in_kubernetes_become_the_shards() -> None:
    from fake_kube import FakeKube, make_pod
    from kubernetes.client import Configuration

    from controller.kube_pods import WatchSettings
    from controller.membership import KubernetesMembership, Role

    kube = FakeKube().start()
    labels = {"app.kubernetes.io/component": "cache"}
    kube.apply(make_pod("kv-cache-0", labels, "10.1.0.4"))
    kube.apply(make_pod("kv-cache-1", labels, "10.1.0.5"))
    membership = KubernetesMembership(
        "default",
        selectors={Role.CACHE: "app.kubernetes.io/component=cache", Role.PREFILL: "x=y"},
        ports={Role.CACHE: 50051, Role.PREFILL: 50052},
        configuration=Configuration(host=kube.url),
        settings=WatchSettings(),
    )
    config = ControllerConfig(port=0, metrics_port=0, refresh_s=0.05)
    try:
        with ControllerServer(config, membership) as server:
            poll(lambda: len(server.board.policy.cache_servers) == 2, 20, "two cache pods")
            names = [(m.name, m.address) for m in server.board.policy.cache_servers]
            assert names == [("kv-cache-0", "10.1.0.4:50051"), ("kv-cache-1", "10.1.0.5:50051")]
            kube.apply(make_pod("kv-cache-1", labels, "10.1.0.5", ready=False))
            poll(lambda: len(server.board.policy.cache_servers) == 1, 20, "unready pod dropped")
            assert 'kvfuse_controller_members{role="cache"} 1.0' in _scrape(server)
    finally:
        kube.stop()


def test_calibration_file_sets_the_floor(tmp_path: Path) -> None:
    curve = (CurvePoint(0.0, 0.2), CurvePoint(0.3, 0.04), CurvePoint(1.0, 0.0))
    path = tmp_path / "cal.json"
    Calibration("m", "bfloat16", 0.05, 0.3, curve, "factqa", 16).save(path)
    config = ControllerConfig(port=0, metrics_port=0, calibration=path, r_max=0.2)
    with ControllerServer(config) as server:
        policy = server.board.policy
        assert policy.ratio.r_quality == 0.3 and policy.ratio.r_max == 0.3  # quality first
        assert policy.r_quality_source.startswith("calibration cal.json")
        body = _scrape(server)
    assert 'dataset="factqa",dtype="bfloat16",r_quality="0.3",target_kl="0.05"} 1.0' in body
