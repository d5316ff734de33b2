"""Bridges a sequence's outputs from the engine (the scheduler threads, or vLLM requests on the
event loop) to an HTTP response (JSON or SSE).

A client that goes away — mid-stream, or while waiting for a non-streamed answer — aborts its
sequence, which frees its batch slot and KV room at the scheduler's next step (or closes its
vLLM stream).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from decode_worker.errors import error_body
from decode_worker.responses import SSE_DONE, Completion, ResponseFormat, sse
from decode_worker.sequence import GenerationRequest, OutputSink, SequenceOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
H = TypeVar("H")


class Engine(Protocol[H]):
    """What decodes: the embedded `Scheduler` or the `VllmEngine`.

    `submit` queues a request whose outputs go to `sink` in order (the last one with a finish
    reason or an error), from any thread; it returns the request's handle or raises
    (PromptTooLongError, ServiceUnavailableError when full or stopping). `abort(handle)` ends
    a request whose client went away (no-op once it finished).
    """

    def submit(self, request: GenerationRequest, sink: OutputSink) -> H: ...

    def abort(self, handle: H, /) -> None: ...


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before its answer was complete (internal)."""


class OutputStream:
    """One submitted sequence's outputs, awaited on the event loop that created it."""

    def __init__(self, engine: Engine[Any], request: GenerationRequest) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[SequenceOutput] = asyncio.Queue()
        self._engine = engine
        self.seq = engine.submit(request, self._put)  # raises when the queue is full
        self.result = Completion(request)

    def _put(self, out: SequenceOutput) -> None:
        """Called from scheduler threads (or the loop itself)."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: the server is going down
            log.debug("dropped an output of %s: event loop closed", self.seq.request_id)

    async def next(self) -> SequenceOutput:
        """The next output (also added to `result`)."""
        out = await self._queue.get()
        self.result.add(out)
        return out

    def close(self) -> None:
        """Aborts the sequence unless it already finished."""
        if not self.result.done:
            self._engine.abort(self.seq)


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, or raises ClientDisconnected (cancelling it) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientDisconnected


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(
    request: Request,
    stream: OutputStream,
    fmt: ResponseFormat,
    streaming: bool,
    include_usage: bool,
) -> Response:
    """Waits for the first token (so prefill errors get their own status code), then
    returns the whole answer as JSON, or the rest as server-sent events.

    Raises:
        the sequence's error (mapped by `decode_worker.errors`).
    """
    headers = {"X-Request-Id": fmt.request_id}
    try:
        if streaming:
            first = await until_disconnected(request, stream.next())
            if first.error is not None:
                raise first.error
            body = _events(stream, fmt, first, include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        result = await until_disconnected(request, _collect(stream))
    except ClientDisconnected:
        stream.close()
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except BaseException:
        stream.close()
        raise
    if result.error is not None:
        raise result.error
    return JSONResponse(fmt.response(result), headers=headers)


async def _collect(stream: OutputStream) -> Completion:
    while not stream.result.done:
        await stream.next()
    return stream.result


async def _events(
    stream: OutputStream, fmt: ResponseFormat, first: SequenceOutput, include_usage: bool
) -> AsyncIterator[bytes]:
    """`data: {chunk}` events, an error event if the request fails midway, then `[DONE]`."""
    try:
        for chunk in fmt.head_chunks():
            yield sse(chunk)
        out = first
        while True:
            if out.error is not None:
                yield sse(error_body(out.error))
                break
            reason = out.finish_reason.value if out.finish_reason is not None else None
            if out.text or reason is not None:
                yield sse(fmt.text_chunk(out.text, reason))
            if reason is not None:
                if include_usage:
                    yield sse(fmt.usage_chunk(stream.result))
                break
            out = await stream.next()
        yield SSE_DONE
    finally:
        stream.close()  # aborts the sequence when the client went away mid-stream
