"""A kvfuse service's gRPC server: thread pool, limits, health, reflection, TLS, metrics, stop."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from concurrent import futures
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from kvfuse.errors import ConfigError
from kvfuse.service.metrics_http import MetricsEndpoint
from kvfuse.service.tls import server_credentials

Behavior = Callable[[Any, grpc.ServicerContext], Any]
S = TypeVar("S", bound="GrpcService")
_FACTORIES = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


def address(host: str, port: int) -> str:
    """The "host:port" of an address, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap: Callable[[Behavior, bool], Behavior],
    response_serializer: Callable[[Any], bytes] | None = None,
) -> grpc.RpcMethodHandler | None:
    """The same handler with its behavior replaced by `wrap(behavior, response_streaming)`
    (for interceptors) and, when given, its response serializer; None stays None."""
    if handler is None:
        return None
    factory, attr = _FACTORIES[(handler.request_streaming, handler.response_streaming)]
    return factory(
        wrap(getattr(handler, attr), handler.response_streaming),
        request_deserializer=handler.request_deserializer,
        response_serializer=response_serializer or handler.response_serializer,
    )


class PreEncodedInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Lets the named methods yield responses already serialized (`bytes`, see
    `kvfuse.transport.protowire`) beside messages: bytes pass through the serializer untouched.
    Install it innermost. Thread-safe."""

    def __init__(self, methods: Collection[str]) -> None:
        self._methods = frozenset(methods)

    def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method not in self._methods:
            return handler
        serialize = handler.response_serializer

        def pass_bytes(response: Any) -> bytes:
            return response if isinstance(response, bytes) else serialize(response)

        return wrap_handler(handler, lambda behavior, _streaming: behavior, pass_bytes)


class GrpcServer:
    """One service's gRPC server with the standard health and reflection services, optional
    TLS/mTLS, and its Prometheus endpoint beside it.

    Lifecycle: construct, register the servicer on `server`, `start` (binds the port, starts
    the metrics endpoint, serves, marks the service SERVING), `stop` (idempotent). The pool
    has `num_workers` threads; at most 4x as many RPCs are admitted, the rest are refused
    with RESOURCE_EXHAUSTED. Idle connections are pinged, so streams of vanished clients are
    cancelled. Not thread-safe: start and stop from one thread.

    Args:
        service_name: the full proto name, e.g. "kvfuse.v1.CacheService".
        host, port: listen address; port 0 picks a free port (see `port` after `start`).
        num_workers: RPC worker threads, named `thread_name_prefix`-N.
        max_message_bytes: send and receive message limit.
        interceptors: outermost first.
        tls_cert, tls_key: certificate chain and key (PEM files); None serves plaintext.
        tls_client_ca: roots of the client certificates to require (mTLS); None: none asked.
        metrics_registry, metrics_port: what to serve at /metrics on `host`; None: no endpoint.
    """

    def __init__(
        self,
        service_name: str,
        *,
        host: str,
        port: int,
        num_workers: int,
        max_message_bytes: int,
        thread_name_prefix: str,
        interceptors: Sequence[grpc.ServerInterceptor] = (),
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_client_ca: Path | None = None,
        metrics_registry: CollectorRegistry | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.service_name = service_name
        self.host = host
        self._requested_port = port
        self._tls = (tls_cert, tls_key, tls_client_ca)
        self._metrics = (metrics_registry, metrics_port)
        self._health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(num_workers, thread_name_prefix=thread_name_prefix),
            interceptors=list(interceptors),
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share
                # ping idle connections so streams of vanished clients are cancelled
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
            maximum_concurrent_rpcs=4 * num_workers,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self.server)
        reflection.enable_server_reflection(
            (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0
        self._metrics_endpoint: MetricsEndpoint | None = None
        self.stopped = False

    @property
    def address(self) -> str:
        """host:port clients connect to (valid after `start`)."""
        return address(self.host, self.port)

    @property
    def metrics_port(self) -> int | None:
        """The /metrics port (after `start`); None without an endpoint."""
        return None if self._metrics_endpoint is None else self._metrics_endpoint.port

    def start(self) -> None:
        """Binds, starts the metrics endpoint, serves, and reports SERVING for "" and the service.

        Raises:
            ConfigError: the address cannot be bound or a TLS file cannot be read.
            OSError: the metrics port cannot be bound.
        """
        bind_to = address(self.host, self._requested_port)
        credentials = server_credentials(*self._tls)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(bind_to)
            else:
                self.port = self.server.add_secure_port(bind_to, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {bind_to}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {bind_to}")
        registry, metrics_port = self._metrics
        if registry is not None and metrics_port is not None:
            self._metrics_endpoint = MetricsEndpoint(registry, self.host, metrics_port)
        self.server.start()
        for service in ("", self.service_name):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float) -> None:
        """Reports NOT_SERVING, stops taking RPCs, waits up to `grace_s` for in-flight ones,
        then closes the metrics endpoint. Idempotent; fine before `start`."""
        if self.stopped:
            return
        self.stopped = True
        self._health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
            self._metrics_endpoint = None

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (or `timeout_s` passes); True if it stopped."""
        timed_out = self.server.wait_for_termination(timeout_s)
        return not timed_out


class GrpcService(ABC):
    """Base of a service's server object (CacheServer, PrefillServer) around a GrpcServer.

    The subclass builds `grpc` and registers its servicer in `__init__`, implements `start`
    (start `grpc`, log, return self) and `close` (release what it owns: store, threads,
    clients). Here: the addresses, `stop` (gRPC first, then `close`, once), `wait`, and use
    as a context manager (start on enter, stop on exit).

    Args:
        grpc_server: the subclass's server, not started.
        grace_s: the default of `stop(grace_s)`.
    """

    def __init__(self, grpc_server: GrpcServer, grace_s: float) -> None:
        self.grpc = grpc_server
        self._grace_s = grace_s

    @property
    def port(self) -> int:
        """The bound gRPC port (after `start`)."""
        return self.grpc.port

    @property
    def address(self) -> str:
        """host:port clients connect to (valid after `start`)."""
        return self.grpc.address

    @property
    def metrics_port(self) -> int | None:
        """The bound /metrics port (after `start`); None when the endpoint is off."""
        return self.grpc.metrics_port

    @abstractmethod
    def start(self: S) -> S:
        """Binds and serves; returns self. Raises ConfigError when it cannot listen."""

    @abstractmethod
    def close(self) -> None:
        """Releases what the service owns; called once, after gRPC has stopped."""

    def stop(self, grace_s: float | None = None) -> None:
        """Stops taking RPCs, waits up to `grace_s` (default: the configured one) for in-flight
        ones, closes the metrics endpoint, then `close`. Idempotent; fine after a failed start."""
        if self.grpc.stopped:
            return
        self.grpc.stop(self._grace_s if grace_s is None else grace_s)
        self.close()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until the server stops (or `timeout_s` passes); True if it stopped."""
        return self.grpc.wait(timeout_s)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
