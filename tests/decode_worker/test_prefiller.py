"""The decode worker over a real prefill worker (gRPC on 127.0.0.1): same answers as local
prefill, chunk hits reported from the remote stats, /health follows the worker's health."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import openai
import pytest
from decode_helpers import DOCS, QUESTION, SYSTEM, TOKEN, ThreadServer, poll, rag_messages
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from decode_worker.app import create_app
from decode_worker.config import DecodeConfig
from decode_worker.prefiller import FailFast, HealthProbe, is_loopback, remote_backend
from decode_worker.service import DecodeService
from kvfuse.engine import Engine
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel
from kvfuse.prefill import PrefillRequest
from kvfuse.prefill.sources import StoreSource
from prefill_worker.config import PrefillConfig
from prefill_worker.server import PrefillServer

GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 10}


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, str]]:
    """A gRPC server with only the standard health service."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=0)


def test_health_probe_follows_the_serving_status(
    health_server: tuple[health.HealthServicer, str],
) -> None:
    servicer, address = health_server
    probe = HealthProbe(address)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe.ready()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert not probe.ready()
    probe.close()
    assert not HealthProbe("127.0.0.1:1", timeout_s=0.5).ready()  # nothing listens there


@pytest.fixture
def prefill_server(engine: Engine) -> Iterator[PrefillServer]:
    config = PrefillConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        auth_token=TOKEN,
        miss_policy=engine.miss_policy,
    )
    server = PrefillServer(config, engine.compute, [StoreSource(engine.store)]).start()
    yield server
    server.stop(grace_s=0)


@pytest.fixture
def remote_url(prefill_server: PrefillServer, smollm: LoadedModel) -> Iterator[str]:
    """A decode worker (uvicorn in a thread) whose prefill is the worker above."""
    config = DecodeConfig(
        host="127.0.0.1", port=0, prefill_url=prefill_server.address, auth_token=TOKEN
    )
    backend = remote_backend(config.prefill_url, TOKEN, config.prefill_timeout_s)
    with ThreadServer(create_app(DecodeService(config, smollm, backend))) as url:
        yield url


def chat(url: str, mode: str, ratio: float | None = None, **kwargs: Any) -> Any:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120)
    kvfuse: dict[str, Any] = {"mode": mode}
    if ratio is not None:
        kvfuse["recompute_ratio"] = ratio
    return client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=rag_messages(),  # type: ignore[arg-type]
        extra_body={"kvfuse": kvfuse},
        **{**GREEDY, **kwargs},
    )


def test_remote_prefill_answers_like_local_prefill(
    remote_url: str, prefill_server: PrefillServer, engine: Engine
) -> None:
    full = chat(remote_url, "full_prefill")
    local = engine.generate([SYSTEM, *DOCS, QUESTION], "full_prefill", max_tokens=10)
    assert full.choices[0].message.content == local.text
    cold = chat(remote_url, "blend")
    assert cold.usage.model_extra["kvfuse"]["chunk_hits"] == 0
    poll(lambda: engine.store.stats().num_objects >= 4, 120, "the write-behind to store chunks")
    blend = chat(remote_url, "blend", 1.0)
    assert blend.usage.model_extra["kvfuse"]["chunk_hits"] == 3
    assert blend.choices[0].message.content == full.choices[0].message.content
    streamed = chat(remote_url, "blend", 1.0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == full.choices[0].message.content


def test_health_follows_the_prefill_worker(remote_url: str, prefill_server: PrefillServer) -> None:
    assert httpx.get(f"{remote_url}/health").status_code == 200
    prefill_server.stop(grace_s=0)
    response = httpx.get(f"{remote_url}/health")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == 503
    failed = httpx.post(
        f"{remote_url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    assert failed.status_code == 503 and failed.json()["error"]["message"]


def test_a_wrong_prefill_token_is_a_503_not_a_401(
    prefill_server: PrefillServer, smollm: LoadedModel
) -> None:
    config = DecodeConfig(host="127.0.0.1", prefill_url=prefill_server.address, auth_token=TOKEN)
    backend = remote_backend(config.prefill_url, "not-the-token", 30.0)
    with ThreadServer(create_app(DecodeService(config, smollm, backend))) as url:
        response = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=120,
        )
    assert (
        response.status_code == 503 and "refused our token" in response.json()["error"]["message"]
    )


def warm(url: str, docs: tuple[str, ...] = DOCS) -> httpx.Response:
    body = {"system": SYSTEM, "documents": list(docs)}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.post(f"{url}/kvfuse/warm", json=body, headers=headers, timeout=120)


def test_warm_stores_through_the_prefill_worker(remote_url: str, engine: Engine) -> None:
    response = warm(remote_url)
    assert response.status_code == 200, response.text
    assert (response.json()["objects"], response.json()["stored"]) == (4, 4)
    assert engine.store.stats().num_objects == 4  # the prefill worker's chunk source
    blend = chat(remote_url, "blend")
    assert blend.usage.model_extra["kvfuse"]["chunk_hits"] == 3


class RefusingSource(StoreSource):
    def put(self, key: str, kv: ChunkKV) -> bool:
        raise ServiceUnavailableError("UNAVAILABLE: the cache is down")


def test_warm_that_cannot_store_is_a_503(engine: Engine, smollm: LoadedModel) -> None:
    config = PrefillConfig(
        host="127.0.0.1", port=0, metrics_port=None, miss_policy=engine.miss_policy
    )
    prefill = PrefillServer(config, engine.compute, [RefusingSource(engine.store)])
    decode_config = DecodeConfig(host="127.0.0.1", prefill_url=prefill.start().address)
    backend = remote_backend(prefill.address, "", 30.0)
    try:
        with ThreadServer(create_app(DecodeService(decode_config, smollm, backend))) as url:
            response = warm(url, DOCS[:2])
    finally:
        prefill.stop(grace_s=0)
    assert response.status_code == 503
    assert "3 of 3 objects could not be stored" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50052", True),
        ("127.3.2.1:1", True),
        ("localhost:50052", True),
        ("[::1]:50052", True),
        ("dns:///localhost:50052", True),
        ("10.0.0.7:50052", False),
        ("prefill.kvfuse.svc.cluster.local:50052", False),
        ("[2001:db8::1]:50052", False),
    ],
)
def test_is_loopback(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_requests_fail_fast_while_the_prefill_worker_does_not_answer(engine: Engine) -> None:
    """A worker that accepts connections but never answers (hung): once the health watch has
    seen it, prefill and warm calls are refused at once instead of waiting out their
    deadline."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        target = f"127.0.0.1:{hung.getsockname()[1]}"
        backend = remote_backend(target, "", timeout_s=60.0, health_interval_s=0.2)
        try:
            guarded = backend.prefiller
            assert isinstance(guarded, FailFast)
            poll(lambda: not guarded.watch.healthy, what="the watch to see the hung worker")
            request = PrefillRequest("r", engine.prepare([SYSTEM, *DOCS, QUESTION]).segments)
            with pytest.raises(ServiceUnavailableError, match="not serving"):
                guarded.prefill(request)
            with pytest.raises(ServiceUnavailableError, match="not serving"):
                guarded.warm_chunks(request.segments)
        finally:
            backend.close()
