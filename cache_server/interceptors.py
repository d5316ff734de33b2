"""The cache server's own interceptor: status mapping plus metrics around every CacheService RPC."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cache_server import status
from cache_server.metrics import CacheMetrics
from kvfuse.errors import KvfuseError
from kvfuse.service.grpc_server import Behavior, wrap_handler

SERVICE_PREFIX = "/kvfuse.v1.CacheService/"


class ObservingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Maps KvfuseErrors raised by CacheService methods to status codes (via `status`) and
    records each RPC's duration and final code. Install it outermost. Thread-safe."""

    def __init__(self, metrics: CacheMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if not details.method.startswith(SERVICE_PREFIX):
            return handler
        op = details.method[len(SERVICE_PREFIX) :]
        return wrap_handler(handler, lambda b, streaming: self._observe(op, b, streaming))

    def _observe(self, op: str, behavior: Behavior, response_streaming: bool) -> Behavior:
        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                return behavior(request, context)
            except KvfuseError as exc:
                code = status.code_of(exc)
                status.abort(context, exc)
            except BaseException as exc:
                code = _final_code(exc, context)
                raise
            finally:
                self._metrics.observe_request(op, code.name, time.perf_counter() - start)

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                yield from behavior(request, context)
            except KvfuseError as exc:
                code = status.code_of(exc)
                status.abort(context, exc)
            except BaseException as exc:
                code = _final_code(exc, context)
                raise
            finally:
                self._metrics.observe_request(op, code.name, time.perf_counter() - start)

        return streaming if response_streaming else unary


def _final_code(exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
    """The code an RPC ends with when something other than a KvfuseError stopped it."""
    code = context.code()  # set when the handler aborted with an explicit status
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, GeneratorExit) or not context.is_active():
        return grpc.StatusCode.CANCELLED  # the client went away mid-stream
    return grpc.StatusCode.UNKNOWN
