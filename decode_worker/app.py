"""The HTTP face of the decode worker: the routes a vLLM production-stack router expects.

Thin: each text route reads its body (at most `max_body_bytes`: `body_limit`), has
`DecodeService.intake` parse, validate and tokenize it on a worker thread, and hands the
request to `streaming.respond`; the event loop only moves bytes, so /health and /metrics
answer while bodies are prepared. Errors become responses in `decode_worker.errors`.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from decode_worker import errors
from decode_worker.body_limit import BodyLimitMiddleware
from decode_worker.metrics import DecodeMetrics
from decode_worker.responses import ResponseFormat
from decode_worker.schemas import StreamOptions
from decode_worker.sequence import GenerationRequest
from decode_worker.service import DecodeService
from decode_worker.streaming import OutputStream, respond
from kvfuse.errors import AuthError, ServiceUnavailableError

REQUEST_ID_HEADER = "X-Request-Id"  # read lower-cased from the ASGI scope
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,256}")  # visible ASCII, as a header value allows
_OPS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/models": "models",
    "/tokenize": "tokenize",
    "/health": "health",
    "/metrics": "metrics",
    "/kvfuse/warm": "warm",
}


class RequestIdMiddleware:
    """Honours `X-Request-Id` (or makes one), echoes it on every response, counts responses
    by route and status, and turns errors nothing else handled into a 500 error body."""

    def __init__(self, app: ASGIApp, metrics: DecodeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = (
            dict(scope["headers"]).get(REQUEST_ID_HEADER.lower().encode(), b"").decode("latin-1")
        )
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        op, started = _OPS.get(scope["path"], "other"), False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
                self.metrics.on_response(op, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:
                raise
            await errors.error_response(exc)(scope, receive, send_with_id)


def create_app(service: DecodeService) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops `service`."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()
            await service.aclose()

    app = FastAPI(title="kvfuse decode worker", lifespan=lifespan)
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(RequestIdMiddleware, metrics=service.metrics)  # outermost
    auth = [Depends(_bearer_auth(service.config.auth_token))]

    @app.get("/health")
    def health() -> Response:  # sync: FastAPI runs it in a thread (a remote probe may block)
        problem = service.health()
        if problem is None:
            return Response(status_code=200)
        return errors.error_response(ServiceUnavailableError(problem))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> dict[str, Any]:
        token_ids = (await service.intake.tokenize(await request.body())).token_ids
        return {
            "count": len(token_ids),
            "max_model_len": service.max_model_len,
            "tokens": token_ids,
        }

    @app.post("/kvfuse/warm", dependencies=auth)
    async def warm(request: Request) -> dict[str, Any]:
        body, segments = await service.intake.warm(await request.body())
        result = await run_in_threadpool(service.warm, segments, request.state.request_id)
        if result.num_failed:
            raise ServiceUnavailableError(
                f"{result.num_failed} of {result.num_objects} objects could not be stored "
                f"({result.num_stored} stored, {result.num_present} already present); warm "
                "again to retry them"
            )
        return {
            "object": "kvfuse.warm",
            "model": service.model_name,
            "documents": len(body.documents),
            "objects": result.num_objects,
            "present": result.num_present,
            "stored": result.num_stored,
            "computed_tokens": result.num_computed_tokens,
            "warm_s": round(result.warm_s, 4),
        }

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        raw = await request.body()
        body, gen = await service.intake.completion(raw, request.state.request_id)
        return await _generate(service, request, gen, False, body.stream, body.stream_options)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        body, gen = await service.intake.chat(raw, request.state.request_id)
        return await _generate(service, request, gen, True, body.stream, body.stream_options)

    return app


def _bearer_auth(token: str) -> Any:
    """A dependency requiring `Authorization: Bearer <token>` (nothing when token is empty)."""
    expected = token.encode()

    async def check(authorization: str | None = Header(default=None)) -> None:
        if not expected:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise AuthError("missing or wrong bearer token")

    return check


async def _generate(
    service: DecodeService,
    request: Request,
    gen: GenerationRequest,
    chat: bool,
    stream: bool,
    options: StreamOptions | None,
) -> Response:
    fmt = ResponseFormat(chat=chat, request_id=gen.prefill.request_id, model=service.model_name)
    include_usage = options is not None and options.include_usage
    return await respond(request, OutputStream(service.engine, gen), fmt, stream, include_usage)
