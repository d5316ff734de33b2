"""Closed-loop HTTP load generator: streamed chat requests, TTFT from the first content chunk.

`run_closed_loop` keeps `concurrency` requests in flight (each worker sends its next request as
soon as its previous one finished), so throughput is what the server sustains at that
concurrency. Times are `time.perf_counter()` seconds on the client.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvfuse.errors import ConfigError

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class RequestResult:
    """What one streamed request measured.

    Attributes:
        ttft_s: Send → first chunk carrying generated text (or the finish reason, if the
            answer is empty); None when the request failed before that.
        latency_s: Send → end of stream.
        num_chunks: Content chunks received.
        usage: The `usage` object of the last chunk (OpenAI shape, `kvfuse` extension
            included when the server sends it); empty when the server sent none.
        text: The generated text.
        error: Why the request failed (HTTP status and body, transport error); "" when it
            succeeded.
        start_s: `time.perf_counter()` when the request was sent (its timeline origin).
    """

    ttft_s: float | None
    latency_s: float
    num_chunks: int = 0
    usage: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    error: str = ""
    start_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error and self.ttft_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (latency − TTFT) / (tokens − 1), tokens from
        `usage.completion_tokens` (vLLM's definition); None when fewer than 2 tokens."""
        tokens = self.usage.get("completion_tokens")
        if not self.ok or not isinstance(tokens, int) or tokens < 2 or self.ttft_s is None:
            return None
        return (self.latency_s - self.ttft_s) / (tokens - 1)


@dataclass(frozen=True)
class PhaseResult:
    """One closed-loop phase: per-request results in request order, and its wall time."""

    concurrency: int
    results: tuple[RequestResult, ...]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        """TTFT p50/p90 (s), time per output token p50 (s), mean latency, throughput (req/s),
        errors and kvfuse reuse stats."""
        ok = [r for r in self.results if r.ok]
        ttfts = sorted(r.ttft_s for r in ok if r.ttft_s is not None)
        tpots = sorted(t for r in ok if (t := r.tpot_s) is not None)
        stats: dict[str, Any] = {
            "concurrency": self.concurrency,
            "num_requests": len(self.results),
            "num_errors": len(self.results) - len(ok),
            "ttft_p50_s": percentile(ttfts, 50),
            "ttft_p90_s": percentile(ttfts, 90),
            "tpot_p50_s": percentile(tpots, 50),
            "latency_mean_s": sum(r.latency_s for r in ok) / len(ok) if ok else None,
            "throughput_rps": len(ok) / self.wall_s if self.wall_s > 0 else None,
            "prompt_tokens_mean": _mean_usage(ok, "prompt_tokens"),
        }
        chunks = sum(_kvfuse(r).get("chunks", 0) for r in ok)
        if chunks:
            stats["chunk_hit_rate"] = sum(_kvfuse(r).get("chunk_hits", 0) for r in ok) / chunks
        errors = [r.error for r in self.results if r.error]
        if errors:
            stats["first_error"] = errors[0][:300]
        return stats


def _kvfuse(result: RequestResult) -> dict[str, Any]:
    value = result.usage.get("kvfuse")
    return value if isinstance(value, dict) else {}


def _mean_usage(results: Sequence[RequestResult], key: str) -> float | None:
    values = [r.usage[key] for r in results if isinstance(r.usage.get(key), int)]
    return sum(values) / len(values) if values else None


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile `q` in [0, 100] of ascending values; None if empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data:` payloads of a server-sent event stream, stopping at `[DONE]`.

    Multi-line `data:` fields of one event are joined with newlines (the SSE rules); comments
    and other fields are skipped.
    """
    buffer: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            buffer.append(line[5:].removeprefix(" "))
            continue
        if line.strip() or not buffer:
            continue  # a comment, another field, or a blank line with no pending data
        payload, buffer = "\n".join(buffer), []
        if payload == "[DONE]":
            return
        yield payload
    if buffer and (payload := "\n".join(buffer)) != "[DONE]":
        yield payload


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, bool]:
    """(generated text, whether a finish reason is set) of one chat or completion chunk."""
    text, finished = "", False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        text += str(delta.get("content") or choice.get("text") or "")
        finished = finished or choice.get("finish_reason") is not None
    return text, finished


@dataclass
class _Progress:
    """What a stream delivered so far (mutable, one request)."""

    start_s: float
    ttft_s: float | None = None
    text: str = ""
    num_chunks: int = 0
    usage: dict[str, Any] = field(default_factory=dict)

    def add(self, chunk: dict[str, Any]) -> None:
        piece, finished = _chunk_text(chunk)
        if (piece or finished) and self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.start_s
        self.num_chunks += bool(piece)
        self.text += piece
        self.usage = chunk.get("usage") or self.usage

    def result(self, error: str = "") -> RequestResult:
        if not error and self.ttft_s is None:
            error = "stream carried no content"
        latency_s = time.perf_counter() - self.start_s
        return RequestResult(
            self.ttft_s, latency_s, self.num_chunks, self.usage, self.text, error, self.start_s
        )


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> RequestResult:
    """POSTs one streaming request and reads it to the end; never raises for HTTP failures.

    Args:
        client: Shared client (its pool must allow the wanted concurrency).
        url: Full URL, e.g. http://127.0.0.1:8000/v1/chat/completions.
        body: JSON body with `"stream": true`.
        headers: Extra headers (e.g. Authorization).
    """
    progress = _Progress(time.perf_counter())
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:500]
                return progress.result(f"HTTP {response.status_code}: {detail}")
            async for payload in sse_data(response.aiter_lines()):
                chunk = json.loads(payload)
                if "error" in chunk:
                    return progress.result(f"stream error: {json.dumps(chunk['error'])[:300]}")
                progress.add(chunk)
    except (httpx.HTTPError, ValueError) as err:  # ValueError: a payload that is not JSON
        return progress.result(repr(err))
    return progress.result()


async def run_closed_loop(
    url: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PhaseResult:
    """Sends every body once with at most `concurrency` in flight; results in body order.

    Raises:
        ConfigError: `concurrency` < 1.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    results: list[RequestResult | None] = [None] * len(bodies)
    next_idx = iter(range(len(bodies)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            for idx in next_idx:  # a shared iterator: each index is taken once
                results[idx] = await stream_request(client, url, bodies[idx], headers)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)) or 1)))
        wall_s = time.perf_counter() - start
    return PhaseResult(concurrency, tuple(r for r in results if r is not None), wall_s)


def run_phase(
    url: str,
    bodies: Sequence[dict[str, Any]],
    concurrency: int,
    headers: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> PhaseResult:
    """`run_closed_loop` from synchronous code (starts and closes its own event loop)."""
    return asyncio.run(run_closed_loop(url, bodies, concurrency, headers, timeout_s))
