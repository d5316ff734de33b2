"""The decode worker's Prefiller (and ChunkWarmer): the in-process engine, or a remote prefill
worker over gRPC."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.prefill import ChunkWarmer, Prefiller

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillBackend:
    """A Prefiller and ChunkWarmer with its readiness probe (for /health) and its cleanup."""

    prefiller: Prefiller
    warmer: ChunkWarmer
    ready: Callable[[], bool]
    close: Callable[[], None]
    name: str
    remote: bool = False
    shares_cores: bool = True  # the prefill computes on this machine's cores


def is_loopback(target: str) -> bool:
    """Whether a "host:port" gRPC target names this machine (localhost or a loopback IP)."""
    host = target.removeprefix("dns:").lstrip("/").rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_backend(engine: Engine) -> PrefillBackend:
    """Prefill in this process (`Engine.prefill`, one prompt at a time); always ready."""
    return PrefillBackend(engine, engine, lambda: True, lambda: None, "local")


def remote_backend(target: str, token: str, timeout_s: float) -> PrefillBackend:
    """A prefill worker at `target` ("host:port"), probed through grpc.health.v1."""
    client = PrefillClient(target, token=token or None, timeout_s=timeout_s)
    probe = HealthProbe(target)

    def close() -> None:
        client.close()
        probe.close()

    name, local = f"remote {target}", is_loopback(target)
    return PrefillBackend(client, client, probe.ready, close, name, remote=True, shares_cores=local)


class HealthProbe:
    """Asks a gRPC server's standard health service whether it is SERVING. Thread-safe."""

    def __init__(self, target: str, timeout_s: float = 1.0, service: str = "") -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._timeout_s = timeout_s
        self._service = service

    def ready(self) -> bool:
        request = health_pb2.HealthCheckRequest(service=self._service)
        try:
            response = self._stub.Check(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            log.info("prefill worker not ready: %s", exc.code() if hasattr(exc, "code") else exc)
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    def close(self) -> None:
        self._channel.close()
