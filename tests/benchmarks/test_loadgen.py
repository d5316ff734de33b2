"""The load generator against a tiny in-test SSE server on 127.0.0.1: TTFT, text, usage, errors."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from benchmarks.loadgen import (
    PhaseResult,
    RequestResult,
    percentile,
    run_closed_loop,
    run_phase,
    sse_data,
    stream_request,
)
from kvfuse.errors import ConfigError

DEADLINE_S = 10.0


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": finish}],
    }


class FakeServer(ThreadingHTTPServer):
    """Streams a chat completion like the decode worker and vLLM do.

    Body fields it reads: `words` (content chunks), `status` (reply with this HTTP status),
    `error` (an error event after the role chunk), `hold` (wait for `release` after the role
    chunk). It records the largest number of requests in flight.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.role_sent = threading.Event()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/chat/completions"


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            self._reply(body)
        finally:
            with server.lock:
                server.in_flight -= 1

    def _reply(self, body: dict[str, Any]) -> None:
        status = int(body.get("status", 200))
        self.send_response(status)
        self.send_header("Content-Type", "text/event-stream" if status == 200 else "text/plain")
        self.end_headers()
        if status != 200:
            self.wfile.write(b"model overloaded")
            return
        self._event(_chunk({"role": "assistant", "content": ""}))
        if body.get("hold"):
            self.server.role_sent.set()
            self.server.release.wait(DEADLINE_S)
        if body.get("error"):
            self._event({"error": {"message": "boom", "code": 500}})
            return
        words = body.get("words", ["Hello", " world"])
        for word in words:
            self._event(_chunk({"content": word}))
        self._event(_chunk({}, "length"))
        usage = {"prompt_tokens": 7, "completion_tokens": len(words), "kvfuse": body.get("kv")}
        self._event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b": keep-alive comment\n")
        self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
        self.wfile.flush()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(DEADLINE_S)


async def _stream(url: str, body: dict[str, Any]) -> RequestResult:
    async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
        return await stream_request(client, url, body)


def test_stream_request_reads_text_usage_and_ttft(server: FakeServer) -> None:
    kv = {"chunks": 6, "chunk_hits": 4}
    result = asyncio.run(_stream(server.url, {"words": ["The", " answer", "."], "kv": kv}))
    assert result.ok and result.error == ""
    assert result.text == "The answer." and result.num_chunks == 3
    assert result.usage == {"prompt_tokens": 7, "completion_tokens": 3, "kvfuse": kv}
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.latency_s


def test_ttft_waits_for_content_not_the_role_chunk(server: FakeServer) -> None:
    async def scenario() -> tuple[float, float, RequestResult]:
        task = asyncio.ensure_future(_stream(server.url, {"hold": True}))
        deadline = time.perf_counter() + DEADLINE_S
        while not server.role_sent.is_set():  # poll: the role chunk went out, content is held
            assert time.perf_counter() < deadline, "server never sent the role chunk"
            await asyncio.sleep(0.01)
        role_seen = released = time.perf_counter()
        server.release.set()
        return role_seen, released, await task

    role_seen, released, result = asyncio.run(scenario())
    assert result.ok and result.ttft_s is not None
    assert result.start_s <= role_seen  # the request went out before the role chunk came back
    assert result.start_s + result.ttft_s >= released  # TTFT counts from the released content


def test_http_error_and_stream_error_are_results(server: FakeServer) -> None:
    failed = asyncio.run(_stream(server.url, {"status": 503}))
    assert not failed.ok and failed.ttft_s is None
    assert failed.error.startswith("HTTP 503") and "overloaded" in failed.error
    broken = asyncio.run(_stream(server.url, {"error": True}))
    assert not broken.ok and "boom" in broken.error
    empty = asyncio.run(_stream(server.url, {"words": []}))
    assert empty.ok and empty.text == ""  # the finish reason counts as the first token
    gone = asyncio.run(_stream("http://127.0.0.1:1/v1/chat/completions", {}))
    assert not gone.ok and gone.error


def test_closed_loop_keeps_order_and_bounds_concurrency(server: FakeServer) -> None:
    bodies = [{"words": [f"r{i}"]} for i in range(7)]
    phase = run_phase(server.url, bodies, concurrency=3)
    assert [r.text for r in phase.results] == [f"r{i}" for i in range(7)]
    assert 1 <= server.max_in_flight <= 3
    summary = phase.summary()
    assert summary["num_requests"] == 7 and summary["num_errors"] == 0
    assert summary["concurrency"] == 3 and summary["throughput_rps"] > 0
    assert summary["prompt_tokens_mean"] == 7
    with pytest.raises(ConfigError):
        asyncio.run(run_closed_loop(server.url, bodies, concurrency=0))


def test_summary_percentiles_errors_and_hit_rate() -> None:
    def ok(ttft_s: float, hits: int) -> RequestResult:
        usage = {"completion_tokens": 5, "kvfuse": {"chunks": 6, "chunk_hits": hits}}
        return RequestResult(ttft_s, ttft_s + 1 + hits / 3, usage=usage)

    results = (ok(0.1, 6), ok(0.2, 3), ok(0.3, 0), ok(0.4, 3), RequestResult(None, 0.5, error="x"))
    summary = PhaseResult(concurrency=2, results=results, wall_s=2.0).summary()
    assert summary["ttft_p50_s"] == pytest.approx(0.25)
    assert summary["ttft_p90_s"] == pytest.approx(0.37)
    assert summary["throughput_rps"] == pytest.approx(2.0)  # 4 successful in 2 s
    # (latency − TTFT) / 4 tokens after the first: 0.25, 0.5, 0.5, 0.75 s
    assert summary["tpot_p50_s"] == pytest.approx(0.5)
    assert summary["chunk_hit_rate"] == pytest.approx(0.5)
    assert summary["num_errors"] == 1 and summary["first_error"] == "x"
    assert percentile([], 50) is None and percentile([3.0], 90) == 3.0
    assert RequestResult(0.1, 2.0, usage={"completion_tokens": 1}).tpot_s is None
    assert RequestResult(0.1, 2.0).tpot_s is None


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _collect(*lines: str) -> list[str]:
    return [payload async for payload in sse_data(_lines(*lines))]


def test_sse_data_joins_multiline_events_and_stops_at_done() -> None:
    lines = (": hi", "event: x", 'data: {"a":', "data: 1}", "", "", "data:[DONE]", "", "data: 9")
    got = asyncio.run(_collect(*lines))
    assert got == ['{"a":\n1}']
    assert asyncio.run(_collect("data: tail-without-blank-line")) == ["tail-without-blank-line"]
