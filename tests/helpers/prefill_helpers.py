"""Prefill-worker test helpers: a RAG prompt on SmolLM2, chunk sources that hold or fail, child
processes. (A uniquely named module: test dirs have no __init__.py.)"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rag_prompt import DOCS as DOCS
from rag_prompt import QUESTION as QUESTION
from rag_prompt import SYSTEM as SYSTEM

from kvfuse.blend import FusedLayer, Mode
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.errors import ServiceUnavailableError
from kvfuse.kv import ChunkKV, LayerFrame
from kvfuse.prefill import ChunkInfo, PrefillRequest, PrefillResult
from kvfuse.prefill.sources import StoreSource

if TYPE_CHECKING:
    from prefill_worker.server import PrefillServer

MakeServer = Callable[..., "PrefillServer"]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # a worker process loads torch and the model first
HOLD_TIMEOUT_S = 60.0  # a held stream gives up after this (the test then fails)


def make_request(
    engine: Engine,
    docs: Sequence[str] = DOCS,
    question: str = QUESTION,
    mode: Mode = Mode.BLEND,
    ratio: float | None = None,
    request_id: str = "test",
) -> PrefillRequest:
    segments = engine.prepare([SYSTEM, *docs, question]).segments
    return PrefillRequest(request_id, segments, mode, ratio)


def split(items: Sequence[FusedLayer | PrefillResult]) -> tuple[list[FusedLayer], PrefillResult]:
    """A prefill stream's layers and its result; checks the stream's shape."""
    *rest, result = items
    assert isinstance(result, PrefillResult)
    layers = [layer for layer in rest if isinstance(layer, FusedLayer)]
    assert len(layers) == len(rest)
    assert [layer.layer_idx for layer in layers] == list(range(len(layers)))
    return layers, result


def assert_layers_equal(
    got: Sequence[FusedLayer], want: Sequence[FusedLayer], atol: float = 0.0
) -> None:
    """Layer by layer; atol 0 means bit for bit."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.layer_idx == b.layer_idx
        if atol == 0.0:
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v), f"layer {a.layer_idx}"
        else:
            torch.testing.assert_close(a.k, b.k, atol=atol, rtol=0)
            torch.testing.assert_close(a.v, b.v, atol=atol, rtol=0)


def poll(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Waits until `condition()` is true, checking every few ms; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling an observable state, not waiting on timing


def sample(server: PrefillServer, name: str, **labels: str) -> float:
    """A metric sample of the server's registry (0 when absent)."""
    return server.metrics.registry.get_sample_value(name, labels or None) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TestSource:
    """The in-process store as a chunk source, with hooks to hold, break or fail streams.

    Args:
        hold_at: the stream stops before layer `hold_at` until `release` is set.
        fail_at: the stream raises ServiceUnavailableError before layer `fail_at`.
        bad_at: layer `bad_at` arrives with a wrong shape.
        lookup_error: lookups raise this.
    """

    __test__ = False

    def __init__(
        self,
        store: ChunkStore,
        *,
        hold_at: int | None = None,
        fail_at: int | None = None,
        bad_at: int | None = None,
        lookup_error: Exception | None = None,
    ) -> None:
        self.inner = StoreSource(store)
        self.hold_at, self.fail_at, self.bad_at = hold_at, fail_at, bad_at
        self.lookup_error = lookup_error
        self.release = threading.Event()
        self.held = threading.Event()
        self.closed = threading.Event()
        self.sent_layers: list[int] = []
        self.num_puts = 0

    def lookup(self, keys: Sequence[str]) -> dict[str, ChunkInfo]:
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.inner.lookup(keys)

    def get_layers(self, keys: Sequence[str]) -> Iterator[LayerFrame]:
        try:
            for item in self.inner.get_layers(keys):
                if item.layer_idx == self.hold_at and not self.held.is_set():
                    self.held.set()
                    if not self.release.wait(HOLD_TIMEOUT_S):
                        raise ServiceUnavailableError("test hold was never released")
                if item.layer_idx == self.fail_at:
                    raise ServiceUnavailableError("UNAVAILABLE: injected stream failure")
                if item.layer_idx == self.bad_at:
                    item = item._replace(k=item.k[:, :1])
                self.sent_layers.append(item.layer_idx)
                yield item
        finally:
            self.closed.set()

    def put(self, key: str, kv: ChunkKV) -> bool:
        self.num_puts += 1
        return self.inner.put(key, kv)


class Child:
    """A service child process, ready once a stdout line matches `ready` (group 1: address)."""

    def __init__(
        self,
        args: Sequence[str],
        ready: str = r"listening on (\S+)",
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.match: re.Match[str] | None = None
        self._ready_pattern = re.compile(ready)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.match is None:
            self.kill()
            raise RuntimeError(f"{args} did not start:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = self._ready_pattern.search(line)
            if match and self.match is None:
                self.match = match
                self._ready.set()
        self._ready.set()  # exited

    @property
    def address(self) -> str:
        assert self.match is not None
        return self.match.group(1)

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
