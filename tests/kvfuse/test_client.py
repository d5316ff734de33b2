"""The client SDK: sync and async clients against a real server, retries, deadlines, errors."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import torch

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.client import AsyncCacheClient, CacheClient, PutResult, RetryPolicy
from kvfuse.errors import (
    CodecError,
    InvalidObjectError,
    ServiceUnavailableError,
)
from kvfuse.v1 import cache_pb2, cache_pb2_grpc

FAST_RETRY = RetryPolicy(max_attempts=3, backoff_s=0.001, max_backoff_s=0.001)


def key_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def layers_of(seed: int, num_layers: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 64, generator=gen), torch.randn(16, 3, 64, generator=gen))
        for _ in range(num_layers)
    ]  # [T, H_kv, D] per layer


@pytest.fixture(scope="module")
def server() -> Iterator[CacheServer]:
    config = CacheServerConfig.from_mapping({"port": 0, "metrics_port": None, "grace_s": 0})
    with CacheServer(config) as srv:
        yield srv


def test_async_client_round_trip(server: CacheServer) -> None:
    key, layers = key_of("async"), layers_of(1)

    async def scenario() -> None:
        async with AsyncCacheClient(server.address) as c:
            assert await c.lookup([key]) == {key: None}
            assert await c.get(key) is None
            put = await c.put(key, layers, codec="fp16", position_offset=3)
            assert put == PutResult(stored=True, created=True, tier="memory", reason="")
            again = await c.put(key, layers, codec="fp16")
            assert again.stored and not again.created and again.tier == "memory"
            entry = (await c.lookup([key]))[key]
            assert entry is not None and entry.position_offset == 3 and entry.dtype == "float32"
            frames = [f async for f in c.get_layers([key], layers=range(1, 3))]
            assert [f.layer_idx for f in frames] == [1, 2]
            got = await c.get(key)
            assert got is not None and len(got) == 4
            assert torch.allclose(got[3][0], layers[3][0], atol=1e-2)  # fp16 on the wire
            assert await c.pin(key) and await c.unpin(key)
            moved = await c.move(key, "memory", codec="int8")
            assert moved is not None and moved.codec == "int8"
            assert [t.name for t in await c.stats()] == ["memory"]
            entries, next_after = await c.list_page(limit=10)
            assert key in [e.key for e in entries] and next_after == ""
            assert await c.delete(key) == 1
            assert await c.pin(key) is False and await c.move(key, "memory") is None

    asyncio.run(scenario())


def test_inputs_are_checked_before_sending(server: CacheServer) -> None:
    with CacheClient(server.address) as c:
        with pytest.raises(InvalidObjectError):
            c.lookup(["not-a-key"])
        with pytest.raises(InvalidObjectError):
            c.put(key_of("x"), [])
        k = torch.zeros(4, 3, 64)
        with pytest.raises(InvalidObjectError):
            c.put(key_of("x"), [(k, k), (k, torch.zeros(5, 3, 64))])
        with pytest.raises(InvalidObjectError):
            c.put(key_of("x"), [(k.to(torch.int32), k.to(torch.int32))])
        with pytest.raises(CodecError):
            c.put(key_of("x"), [(k, k)], codec="zip")
        with pytest.raises(InvalidObjectError):
            list(c.get_layers([key_of("x")], layers=range(0, 4, 2)))
        with pytest.raises(InvalidObjectError):  # server-side: INVALID_ARGUMENT
            c.move(key_of("x"), "tape")


class FlakyServicer(cache_pb2_grpc.CacheServiceServicer):
    """Fails the first `num_failures` calls with UNAVAILABLE, or hangs until released."""

    def __init__(self, num_failures: int = 0, hang: bool = False) -> None:
        self.num_calls = 0
        self.num_failures = num_failures
        self.hang = hang
        self.release = threading.Event()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        self.num_calls += 1
        if self.hang:
            self.release.wait(30)
        if self.num_calls <= self.num_failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")

    def Lookup(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._maybe_fail(context)
        return cache_pb2.LookupResponse(
            entries=[cache_pb2.Entry(key=k, found=False) for k in request.keys]
        )

    def GetLayers(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.num_calls += 1
        yield cache_pb2.GetLayersResponse(header=cache_pb2.KeyHeader(key=request.keys[0]))
        context.abort(grpc.StatusCode.UNAVAILABLE, "went away mid-stream")


@pytest.fixture
def flaky() -> Iterator[Callable[[FlakyServicer], str]]:
    """Factory: serves a FlakyServicer on a free port and returns its address."""
    servers: list[grpc.Server] = []
    servicers: list[FlakyServicer] = []

    def start(servicer: FlakyServicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        servicers.append(servicer)
        return f"127.0.0.1:{port}"

    yield start
    for servicer in servicers:
        servicer.release.set()
    for server in servers:
        server.stop(0)


def test_unavailable_is_retried_with_backoff(flaky: Callable[[FlakyServicer], str]) -> None:
    servicer = FlakyServicer(num_failures=2)
    with CacheClient(flaky(servicer), retry=FAST_RETRY) as c:
        assert c.lookup([key_of("x")]) == {key_of("x"): None}
    assert servicer.num_calls == 3
    servicer = FlakyServicer(num_failures=5)
    client = CacheClient(flaky(servicer), retry=FAST_RETRY)
    with client, pytest.raises(ServiceUnavailableError, match="UNAVAILABLE"):
        client.lookup([key_of("x")])
    assert servicer.num_calls == 3


def test_deadline_exceeded_is_retried_then_raised(flaky: Callable[[FlakyServicer], str]) -> None:
    servicer = FlakyServicer(hang=True)
    client = CacheClient(flaky(servicer), retry=FAST_RETRY, timeout_s=0.2)
    with client, pytest.raises(ServiceUnavailableError, match="DEADLINE_EXCEEDED"):
        client.lookup([key_of("x")])
    servicer.release.set()
    assert servicer.num_calls == 3


def test_stream_is_not_retried_after_its_first_message(
    flaky: Callable[[FlakyServicer], str],
) -> None:
    servicer = FlakyServicer()
    client = CacheClient(flaky(servicer), retry=FAST_RETRY)
    with client, pytest.raises(ServiceUnavailableError):
        list(client.get_layers([key_of("x")]))
    assert servicer.num_calls == 1


def test_no_server_is_service_unavailable() -> None:
    client = CacheClient("127.0.0.1:1", retry=FAST_RETRY, timeout_s=2)
    with client, pytest.raises(ServiceUnavailableError):
        client.stats()
