"""Real processes on 127.0.0.1: a cache server, a pass-through proxy in front of it, and a
prefill worker (`python -m prefill_worker`) using it; the test process is the decode side.

The worker reaches the cache through the proxy so a test can hold a GetLayers stream at a
chosen layer and kill the process serving it (kill -9) exactly mid-stream. Each test leaves
the processes running. Layers are compared to the in-process engine with atol 1e-4 (another
process; fp32), first tokens exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import torch
from prefill_helpers import (
    DOCS,
    Child,
    assert_layers_equal,
    free_port,
    make_request,
    poll,
    split,
)

from kvfuse.blend import FusedLayer, Mode
from kvfuse.client import CacheClient
from kvfuse.client.prefill import PrefillClient
from kvfuse.engine import Engine
from kvfuse.errors import AuthError
from kvfuse.prefill import MissPolicy, PrefillRequest, PrefillResult

WORKER_TOKEN, CACHE_TOKEN = "worker-token", "cache-token"
PAUSE_AT_LAYER = 5
ATOL = 1e-4
HERE = Path(__file__).resolve().parent


class Stack:
    """cache server ← proxy ← prefill worker, on fixed ports so parts can be restarted."""

    def __init__(self, workdir: Path) -> None:
        self.cache_port, self.proxy_port = free_port(), free_port()
        self.arm_file = workdir / "hold-streams"
        self.cache = self.start_cache()
        try:
            self.proxy = self.start_proxy()
            self.worker = Child(
                [
                    *("-m", "prefill_worker", "--port", "0", "--metrics-port", "0"),
                    *("--cache", f"127.0.0.1:{self.proxy_port}", "--token", WORKER_TOKEN),
                    *("--cache-token", CACHE_TOKEN, "--num-threads", str(torch.get_num_threads())),
                    *("--lookup-deadline-s", "10", "--fetch-deadline-s", "120"),
                ],
                ready=r"kvfuse prefill worker listening on (\S+) .*metrics port (\d+)",
            )
            assert self.worker.match is not None
            self.metrics_url = f"http://127.0.0.1:{self.worker.match.group(2)}/metrics"
        except BaseException:  # no child outlives a failed start
            for child in (self.cache, getattr(self, "proxy", None), getattr(self, "worker", None)):
                if child is not None:
                    child.kill()
            raise

    def start_cache(self) -> Child:
        port = str(self.cache_port)
        return Child(  # no bulk port: layers must pass through the proxy, which the tests break
            [
                *("-m", "cache_server", "--port", port, "--metrics-port", "off"),
                *("--token", CACHE_TOKEN, "--bulk-port", "off"),
            ]
        )

    def start_proxy(self) -> Child:
        return Child(
            [
                *(str(HERE / "cache_proxy.py"), "--listen", f"127.0.0.1:{self.proxy_port}"),
                *("--target", f"127.0.0.1:{self.cache_port}", "--arm-file", str(self.arm_file)),
                *("--pause-at-layer", str(PAUSE_AT_LAYER)),
            ]
        )

    def client(self) -> PrefillClient:
        return PrefillClient(self.worker.address, token=WORKER_TOKEN, timeout_s=300)

    def stored(self, keys: Sequence[str]) -> bool:
        with CacheClient(f"127.0.0.1:{self.cache_port}", token=CACHE_TOKEN) as cache:
            return all(entry is not None for entry in cache.lookup(keys).values())

    def metric(self, name: str) -> float:
        body = httpx.get(self.metrics_url).text
        values = [float(m.group(1)) for m in re.finditer(rf"^{name} (\S+)$", body, re.M)]
        return sum(values)

    def stop(self) -> None:
        for child in (self.worker, self.proxy, self.cache):
            child.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("prefill-stack"))
    yield stack
    stack.stop()


def prefill(stack: Stack, request: PrefillRequest) -> tuple[list[FusedLayer], PrefillResult]:
    with stack.client() as client:
        return split(list(client.prefill(request)))


def ensure_stored(stack: Stack, engine: Engine, docs: Sequence[str] = DOCS) -> None:
    """Sends the prompt once if needed and waits for the write-behind to store it."""
    request = make_request(engine, docs)
    prompt = engine.compute.prepare(request.segments)
    keys = [prompt.prefix_key, *prompt.chunk_keys]
    if not stack.stored(keys):
        prefill(stack, request)
        poll(lambda: stack.stored(keys), what="the write-behind to store the chunks")


def full_prefill(engine: Engine, request: PrefillRequest) -> tuple[list[FusedLayer], PrefillResult]:
    return split(list(engine.prefill(PrefillRequest("ref", request.segments, Mode.FULL_PREFILL))))


def test_cold_request_stores_chunks_and_warm_request_in_another_order_hits(
    stack: Stack, engine: Engine
) -> None:
    docs = tuple(f"{doc} (cold test)" for doc in DOCS)  # not stored by any other test
    engine.miss_policy = MissPolicy.PRECOMPUTE  # the worker's default, for the reference
    cold = make_request(engine, docs)
    layers, result = prefill(stack, cold)
    ref_layers, ref_result = split(list(engine.prefill(cold)))  # also warms the engine's store
    assert result.stats.num_chunk_hits == 0 and result.stats.fallback == ""
    assert_layers_equal(layers, ref_layers, atol=ATOL)
    assert result.first_token_id == ref_result.first_token_id
    prompt = engine.compute.prepare(cold.segments)
    poll(lambda: stack.stored([prompt.prefix_key, *prompt.chunk_keys]), what="write-behind")

    warm = make_request(engine, docs[::-1], "What does Edwin Palk do?")
    layers, result = prefill(stack, warm)
    ref_layers, ref_result = split(list(engine.prefill(warm)))
    assert result.stats.num_chunk_hits == 3 and result.stats.fallback == ""
    assert result.stats.num_cached_tokens == ref_result.stats.num_cached_tokens
    assert_layers_equal(layers, ref_layers, atol=ATOL)
    assert result.first_token_id == ref_result.first_token_id
    assert stack.metric("kvfuse_prefill_write_behind_stored_total") >= 4
    assert stack.metric("kvfuse_prefill_chunk_hits_total") >= 4
    with PrefillClient(stack.worker.address) as anonymous, pytest.raises(AuthError):
        list(anonymous.prefill(warm))


def test_cache_server_killed_mid_stream_still_answers(stack: Stack, warm_engine: Engine) -> None:
    ensure_stored(stack, warm_engine)
    request = make_request(warm_engine)
    items: list[FusedLayer | PrefillResult] = []
    stack.arm_file.touch()  # the proxy holds the next stream before layer PAUSE_AT_LAYER
    try:
        with stack.client() as client:
            for item in client.prefill(request):
                items.append(item)
                if isinstance(item, FusedLayer) and item.layer_idx == PAUSE_AT_LAYER - 1:
                    poll(lambda: any("holding" in line for line in stack.proxy.lines))
                    stack.proxy.kill()  # kill -9 while the stream is open mid-layers
    finally:
        stack.arm_file.unlink()
        stack.proxy = stack.start_proxy()
    layers, result = split(items)
    assert result.stats.fallback == "cache_unavailable"
    blend_layers, _ = split(list(warm_engine.prefill(request)))
    full_layers, full_result = full_prefill(warm_engine, request)
    assert_layers_equal(layers[:PAUSE_AT_LAYER], blend_layers[:PAUSE_AT_LAYER], atol=ATOL)
    assert_layers_equal(layers[PAUSE_AT_LAYER:], full_layers[PAUSE_AT_LAYER:], atol=ATOL)
    assert result.first_token_id == full_result.first_token_id


def test_cache_server_down_computes_full_prefill_then_recovers(
    stack: Stack, engine: Engine
) -> None:
    ensure_stored(stack, engine)
    request = make_request(engine)
    stack.proxy.kill()
    try:
        layers, result = prefill(stack, request)
    finally:
        stack.proxy = stack.start_proxy()
    assert result.stats.fallback == "cache_unavailable" and result.stats.num_chunk_hits == 0
    full_layers, full_result = full_prefill(engine, request)
    assert_layers_equal(layers, full_layers, atol=ATOL)
    assert result.first_token_id == full_result.first_token_id
    assert stack.metric('kvfuse_prefill_fallbacks_total{reason="cache_unavailable"}') >= 1
    poll(
        lambda: prefill(stack, request)[1].stats.num_chunk_hits == 3,
        timeout_s=120,
        what="the worker to use the cache again",
    )


def test_real_cache_server_killed_during_a_request(stack: Stack, engine: Engine) -> None:
    ensure_stored(stack, engine)
    request = make_request(engine)
    items: list[FusedLayer | PrefillResult] = []
    try:
        with stack.client() as client:
            for item in client.prefill(request):
                items.append(item)
                if isinstance(item, FusedLayer) and item.layer_idx == 0:
                    stack.cache.kill()
    finally:
        stack.cache = stack.start_cache()  # back, empty
    layers, result = split(items)
    assert len(layers) == 30
    _, full_result = full_prefill(engine, request)
    if result.stats.fallback:  # the kill landed before the stream ended
        assert result.first_token_id == full_result.first_token_id


def test_command_line_entry_points(capsys: pytest.CaptureFixture[str]) -> None:
    from kvfuse.cli import main as kvfuse_main
    from prefill_worker.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        kvfuse_main(["serve", "prefill", "--help"])
    assert exit_info.value.code == 0
    assert "--fetch-deadline-s" in capsys.readouterr().out
    assert main(["--dtype", "int8"]) == 2  # refused before any model is loaded
    assert "dtype must be one of" in capsys.readouterr().err
