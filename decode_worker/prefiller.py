"""The decode worker's Prefiller (and ChunkWarmer): the in-process engine, or a remote prefill
worker over gRPC."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decode_worker.handoff import HandOff
from kvfuse.blend import FusedLayer
from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.errors import ServiceUnavailableError
from kvfuse.prefill import (
    Cancel,
    ChunkWarmer,
    Prefiller,
    PrefillRequest,
    PrefillResult,
    WarmResult,
)
from kvfuse.segments import PromptSegments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillBackend:
    """A Prefiller and ChunkWarmer with its readiness probe (for /health) and its cleanup.

    Attributes:
        hand_off: a remote worker's hand-off prefill (`PrefillClient.hand_off`, refused at
            once while the worker is unhealthy), for engine vllm; None in process.
    """

    prefiller: Prefiller
    warmer: ChunkWarmer
    ready: Callable[[], bool]
    close: Callable[[], None]
    name: str
    remote: bool = False
    shares_cores: bool = True  # the prefill computes on this machine's cores
    hand_off: HandOff | None = None


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


def remote_backend(
    target: str, token: str, timeout_s: float, health_interval_s: float = 1.0
) -> PrefillBackend:
    """A prefill worker at `target` ("host:port"), probed through grpc.health.v1.

    The probe also runs every `health_interval_s` on a thread of its own: while its last
    answer is "not serving", requests and warm calls fail at once with 503 instead of waiting
    out their deadline on a hung or dead worker.
    """
    client = PrefillClient(target, token=token or None, timeout_s=timeout_s)
    probe = HealthProbe(target)
    watch = HealthWatch(probe.ready, health_interval_s)
    guarded = FailFast(client, watch)

    def close() -> None:
        watch.stop()
        client.close()
        probe.close()

    name, local = f"remote {target}", is_loopback(target)
    return PrefillBackend(
        guarded,
        guarded,
        probe.ready,
        close,
        name,
        remote=True,
        shares_cores=local,
        hand_off=guarded.hand_off,
    )


class HealthWatch:
    """Asks `probe` every `interval_s` on a daemon thread; `healthy` is its last answer (True
    until the first one). `stop` ends the thread. Thread-safe."""

    def __init__(self, probe: Callable[[], bool], interval_s: float) -> None:
        self._probe, self._interval_s = probe, interval_s
        self._stop = threading.Event()
        self.healthy = True
        self._thread = threading.Thread(target=self._run, name="prefill-health", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.healthy = self._probe()
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class FailFast:
    """A `Prefiller` and `ChunkWarmer` that refuses at once while `watch` reports the prefill
    worker unhealthy (ServiceUnavailableError, a 503), and otherwise calls `inner`."""

    inner: PrefillClient
    watch: HealthWatch

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[FusedLayer | PrefillResult]:
        self._check()
        return self.inner.prefill(request, cancel)

    def hand_off(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[str | PrefillResult]:
        self._check()
        return self.inner.hand_off(request, cancel)

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult:
        self._check()
        return self.inner.warm_chunks(segments, request_id)

    def _check(self) -> None:
        if not self.watch.healthy:
            raise ServiceUnavailableError("the prefill worker is not serving (health check)")


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
