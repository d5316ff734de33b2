"""The body size limit over real HTTP: 413 from Content-Length before the body is sent, 413
while a chunked body is read, a body of exactly the limit served."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
from decode_helpers import ThreadServer

from decode_worker.app import create_app
from decode_worker.body_limit import content_length
from decode_worker.config import DecodeConfig
from decode_worker.prefiller import local_backend
from decode_worker.service import DecodeService
from kvfuse.engine import Engine
from kvfuse.model.loader import LoadedModel

LIMIT = 64 << 10


@pytest.fixture
def url(smollm: LoadedModel, engine: Engine) -> Iterator[str]:
    config = DecodeConfig(host="127.0.0.1", port=0, max_body_bytes=LIMIT)
    service = DecodeService(config, smollm, local_backend(engine))
    with ThreadServer(create_app(service)) as url:
        yield url


def completion(size: int) -> bytes:
    """A valid one-token completion body of exactly `size` bytes (padded with spaces)."""
    body = json.dumps({"prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    return body + b" " * (size - len(body))


def test_an_announced_body_over_the_limit_is_refused_before_it_is_sent(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "X-Request-Id: big-1\r\nContent-Length: 10485760\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())  # and not one byte of the body
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    status, _, rest = answer.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer
    assert b"x-request-id: big-1" in headers.lower()
    error = json.loads(body)["error"]
    assert (error["code"], error["type"]) == (413, "RequestTooLargeError")
    assert error["message"] == (
        f"the request body has 10485760 bytes (Content-Length), more than the limit of {LIMIT}"
    )


def test_a_chunked_body_is_refused_once_it_passes_the_limit(url: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(32):
            yield b"x" * 8192

    response = httpx.post(f"{url}/v1/completions", content=chunks(), timeout=60)
    assert "content-length" not in response.request.headers  # sent chunked
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert message == f"the request body is larger than the limit of {LIMIT} bytes"


def test_a_body_of_exactly_the_limit_is_served(url: str) -> None:
    ok = httpx.post(f"{url}/v1/completions", content=completion(LIMIT), timeout=120)
    assert ok.status_code == 200, ok.text
    over = httpx.post(f"{url}/v1/completions", content=completion(LIMIT + 1), timeout=60)
    assert over.status_code == 413 and over.headers["X-Request-Id"]
    for path in ("/v1/chat/completions", "/tokenize", "/kvfuse/warm", "/health", "/nowhere"):
        assert httpx.post(f"{url}{path}", content=completion(LIMIT + 1)).status_code == 413
    metrics = httpx.get(f"{url}/metrics").text
    assert 'kvfuse_decode_requests_total{code="413",op="completions"} 1.0' in metrics


def test_content_length_header() -> None:
    def scope(*values: bytes) -> dict[str, object]:
        return {"headers": [(b"host", b"x"), *((b"content-length", v) for v in values)]}

    assert content_length(scope()) is None
    assert content_length(scope(b"12")) == 12
    assert content_length(scope(b"12", b"99999")) == 99999  # the largest one counts
