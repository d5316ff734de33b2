"""The server around the service: health, reflection, auth and tenants, TLS, metrics, stop."""

from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.cli import main as kvfuse_main
from kvfuse.client import AsyncCacheClient, CacheClient, RetryPolicy
from kvfuse.errors import AuthError, ServiceUnavailableError

NO_RETRY = RetryPolicy(max_attempts=1)


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def layers_of(
    seed: float, num_layers: int = 2, num_tokens: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv = torch.full((num_tokens, 3, 64), seed, dtype=torch.float16)  # [T, H_kv, D]
    return [(kv, kv + 1) for _ in range(num_layers)]


def make_server(**settings: Any) -> CacheServer:
    values = {"port": 0, "metrics_port": None, "memory_bytes": "64MiB", "grace_s": 0}
    return CacheServer(CacheServerConfig.from_mapping(values | settings))


def test_health_and_reflection_answer() -> None:
    with make_server(auth_tokens={"secret": "team-a"}) as srv:
        with grpc.insecure_channel(srv.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "kvfuse.v1.CacheService"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING  # no token needed
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvfuse.v1.Entry"),
            ]
            listed, files = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
        names = {s.name for s in listed.list_services_response.service}
        assert {"kvfuse.v1.CacheService", "grpc.health.v1.Health"} <= names
        assert files.file_descriptor_response.file_descriptor_proto


def test_auth_missing_or_wrong_token_is_unauthenticated() -> None:
    with make_server(auth_tokens={"secret": "team-a"}) as srv:
        for token in (None, "wrong"):
            with CacheClient(srv.address, token=token, retry=NO_RETRY) as c:
                with pytest.raises(AuthError, match="UNAUTHENTICATED"):
                    c.lookup([key_of("x")])
                with pytest.raises(AuthError):
                    c.put(key_of("x"), layers_of(1.0))
                with pytest.raises(AuthError):
                    list(c.get_layers([key_of("x")]))
        with CacheClient(srv.address, token="secret") as c:
            assert c.lookup([key_of("x")]) == {key_of("x"): None}


def test_tenants_never_see_each_others_chunks() -> None:
    key = key_of("shared-document")
    with (
        make_server(auth_tokens={"tok-a": "team-a", "tok-b": "team-b"}) as srv,
        CacheClient(srv.address, token="tok-a") as a,
        CacheClient(srv.address, token="tok-b") as b,
    ):
        assert a.put(key, layers_of(1.0)).created
        assert b.lookup([key]) == {key: None}
        assert b.get(key) is None and list(b.get_layers([key])) == []
        assert b.pin(key) is False and b.delete(key) == 0
        assert b.put(key, layers_of(2.0)).created  # its own copy under the same chunk key
        got_a, got_b = a.get(key), b.get(key)
        assert got_a is not None and got_b is not None
        assert got_a[0][0][0, 0, 0].item() == 1.0 and got_b[0][0][0, 0, 0].item() == 2.0
        assert [e.key for e in a.iter_entries()] == [key]
        assert b.delete(key) == 1 and a.get(key) is not None
        stored = sorted(srv.store.keys())
        assert stored == [f"team-a/{key}"]


def test_stats_counters_are_for_the_admin_tenant_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tokens = {"tok-a": "team-a", "tok-ops": "ops"}
    with make_server(auth_tokens=tokens, admin_tenant="ops") as srv:
        with CacheClient(srv.address, token="tok-a") as a:
            assert a.put(key_of("a-1"), layers_of(1.0)).stored
            [memory] = a.stats()
            assert memory.counters_hidden and (memory.name, memory.up, memory.codec) == (
                "memory", True, "raw")  # fmt: skip
            assert memory.capacity_bytes == 64 << 20
            assert (memory.num_objects, memory.stored_bytes, memory.num_evictions) == (0, 0, 0)
        with CacheClient(srv.address, token="tok-ops") as ops:
            [memory] = ops.stats()
            assert not memory.counters_hidden
            assert memory.num_objects == 1 and memory.stored_bytes > 0  # team-a's object too
        admin = ["cache", "--target", srv.address]
        assert kvfuse_main([*admin, "--token", "tok-a", "stats"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^memory\s+yes\s+raw\s+-\s+64\.0 MiB\s+-", out, re.MULTILINE)
        assert "counters hidden" in out
        assert kvfuse_main([*admin, "--token", "tok-ops", "stats"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^memory\s+yes\s+raw\s+\d", out, re.MULTILINE)
        assert "hidden" not in out
    with make_server() as srv, CacheClient(srv.address) as c:  # no tokens: all are "default"
        assert not c.stats()[0].counters_hidden


def test_tls_and_mtls(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = tls_files
    with make_server(tls_cert=cert, tls_key=key) as srv:
        with CacheClient(srv.address, tls_root_cert=cert) as c:
            assert c.put(key_of("tls"), layers_of(3.0)).created
            assert c.get(key_of("tls")) is not None
        plain = CacheClient(srv.address, retry=NO_RETRY, timeout_s=5)
        with plain, pytest.raises(ServiceUnavailableError, match=r"^TLS required: .* plaintext"):
            plain.lookup([key_of("tls")])
    # mTLS: the same self-signed certificate serves as the CA of client certificates
    with make_server(tls_cert=cert, tls_key=key, tls_client_ca=cert) as srv:
        mtls = CacheClient(
            srv.address, tls_root_cert=cert, tls_client_cert=cert, tls_client_key=key
        )
        with mtls as c:
            assert c.lookup([key_of("tls")]) == {key_of("tls"): None}
        no_cert = CacheClient(srv.address, tls_root_cert=cert, retry=NO_RETRY, timeout_s=5)
        refused = r"^TLS connection refused by .* client certificate .*mTLS.* and got none"
        with no_cert, pytest.raises(AuthError, match=refused):
            no_cert.lookup([key_of("tls")])
        other_cert, other_key = _self_signed(tmp_path, "other")
        stranger = CacheClient(srv.address, tls_root_cert=cert, tls_client_cert=other_cert,
                               tls_client_key=other_key, retry=NO_RETRY, timeout_s=5)  # fmt: skip
        with stranger, pytest.raises(AuthError, match="refused this client's certificate"):
            stranger.lookup([key_of("tls")])
        untrusting = CacheClient(srv.address, tls_root_cert=other_cert, retry=NO_RETRY,
                                 timeout_s=5)  # fmt: skip
        with untrusting, pytest.raises(AuthError, match="does not trust the server's certif"):
            untrusting.lookup([key_of("tls")])
    with make_server() as srv:  # a TLS client at a plaintext server
        tls_client = CacheClient(srv.address, tls_root_cert=cert, retry=NO_RETRY, timeout_s=5)
        with tls_client, pytest.raises(ServiceUnavailableError, match="does not speak TLS"):
            tls_client.lookup([key_of("tls")])

    async def aio_plaintext() -> None:
        with make_server(tls_cert=cert, tls_key=key) as srv:
            async with AsyncCacheClient(srv.address, retry=NO_RETRY, timeout_s=5) as c:
                with pytest.raises(ServiceUnavailableError, match=r"^TLS required"):
                    await c.lookup([key_of("tls")])

    asyncio.run(aio_plaintext())


def _self_signed(out: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (no other CA signed it) and its key."""
    cert, key = out / f"{name}.pem", out / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def metered() -> Iterator[CacheServer]:
    with make_server(metrics_port=0) as srv:
        yield srv


def _scrape(port: int) -> dict[str, list[Any]]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    return families


def _value(samples: list[Any], name: str, **labels: str) -> float:
    return float(
        sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())
    )


def test_metrics_endpoint_scrapes_and_parses(metered: CacheServer) -> None:
    assert metered.metrics_port
    with CacheClient(metered.address, retry=NO_RETRY) as c:
        c.put(key_of("m1"), layers_of(1.0, num_layers=3))
        c.get(key_of("m1"))
        c.get(key_of("absent"))
        c.lookup([key_of("m1"), key_of("absent")])
        list(c.get_layers([key_of("m1")], codec="int8"))  # transcoded on the way out
        with pytest.raises(Exception):  # noqa: B017 - any error: we only count its status below
            c.move(key_of("m1"), "tape")
    m = _scrape(metered.metrics_port)
    duration = m["kvfuse_cache_request_duration_seconds"]
    assert _value(duration, "kvfuse_cache_request_duration_seconds_count", op="Put", code="OK") == 1
    assert _value(duration, "kvfuse_cache_request_duration_seconds_count", op="Move",
                  code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert _value(m["kvfuse_cache_stored_bytes"], "kvfuse_cache_stored_bytes", tier="memory") > 0
    assert _value(m["kvfuse_cache_capacity_bytes"], "kvfuse_cache_capacity_bytes") == 64 << 20
    assert _value(m["kvfuse_cache_objects"], "kvfuse_cache_objects", tier="memory") == 1
    assert _value(m["kvfuse_cache_tier_up"], "kvfuse_cache_tier_up", tier="memory") == 1
    assert _value(m["kvfuse_cache_hits"], "kvfuse_cache_hits_total", tier="memory") == 2
    assert _value(m["kvfuse_cache_misses"], "kvfuse_cache_misses_total") == 1
    assert _value(m["kvfuse_cache_lookups"], "kvfuse_cache_lookups_total", result="hit") == 1
    assert _value(m["kvfuse_cache_received_bytes"], "kvfuse_cache_received_bytes_total") > 0
    assert _value(m["kvfuse_cache_sent_bytes"], "kvfuse_cache_sent_bytes_total") > 0
    ratio = m["kvfuse_codec_compression_ratio"]
    assert _value(ratio, "kvfuse_codec_compression_ratio_count", codec="raw") == 3
    assert _value(ratio, "kvfuse_codec_compression_ratio_count", codec="int8") == 3
    assert _value(ratio, "kvfuse_codec_compression_ratio_sum", codec="int8") > 3 * 1.5
    assert _value(m["kvfuse_codec_decode_seconds"], "kvfuse_codec_decode_seconds_count") == 3
    assert _value(m["kvfuse_codec_encode_seconds"], "kvfuse_codec_encode_seconds_count") == 3
    for name in ("kvfuse_cache_evictions", "kvfuse_cache_corrupt_records"):
        assert name in m
    assert all(n.startswith("kvfuse_") for n in m if not n.startswith(("python_", "process_")))


def test_stop_is_graceful_and_idempotent() -> None:
    srv = make_server(metrics_port=0).start()
    with CacheClient(srv.address) as c:
        c.put(key_of("bye"), layers_of(1.0))
    metrics_port = srv.metrics_port
    assert metrics_port
    srv.stop()
    srv.stop()
    assert srv.wait(timeout_s=10)
    client = CacheClient(srv.address, retry=NO_RETRY, timeout_s=2)
    with client, pytest.raises(ServiceUnavailableError):
        client.lookup([key_of("bye")])
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)


def test_busy_port_is_a_config_error() -> None:
    with make_server() as first:
        from kvfuse.errors import ConfigError

        second = make_server(port=first.port)
        with pytest.raises(ConfigError):
            second.start()
        second.stop()


def test_redis_tier_takes_demotions_and_its_outage_is_not_fatal(redis_server: Any) -> None:
    settings = {"memory_bytes": "4MiB", "redis_url": redis_server.url, "redis_codec": "fp16"}
    keys = [key_of(f"redis-{i}") for i in range(6)]
    with make_server(metrics_port=0, **settings) as srv, CacheClient(srv.address) as c:
        for i, key in enumerate(keys):  # 1.4 MiB each (30 layers of 64 x 3 x 64 fp16)
            assert c.put(key, layers_of(float(i), num_layers=30, num_tokens=64)).created
        tiers = {t.name: t for t in c.stats()}
        assert tiers["redis"].codec == "fp16" and tiers["redis"].num_objects >= 1
        entries = c.lookup(keys)
        in_redis = [k for k, e in entries.items() if e is not None and e.tier == "redis"]
        assert in_redis and all(e is not None for e in entries.values())
        got = c.get(in_redis[0])  # fp16 in Redis, promoted back into memory as raw
        assert got is not None and len(got) == 30
        redis_server.stop()
        # Redis down: what memory holds is still served, the rest is a miss, nothing raises
        after = c.lookup(keys)
        assert any(e is not None for e in after.values())
        assert any(e is None for e in after.values())
        assert all(c.get(k) is None for k, e in after.items() if e is None)
        assert c.put(key_of("during-outage"), layers_of(9.0)).created
        metrics = _scrape(srv.metrics_port or 0)
        up = metrics["kvfuse_cache_tier_up"]
        assert _value(up, "kvfuse_cache_tier_up", tier="redis") == 0
        assert _value(up, "kvfuse_cache_tier_up", tier="memory") == 1
