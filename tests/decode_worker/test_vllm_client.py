"""What the vLLM engine sends vLLM and reads back, without vLLM: the request body, the stream's
events and errors, and a decode worker whose vLLM is out of reach answering 503."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from decode_helpers import ThreadServer, rag_messages

from decode_worker.app import create_app
from decode_worker.config import DecodeConfig
from decode_worker.prefiller import remote_backend
from decode_worker.sequence import GenerationRequest
from decode_worker.served_model import load_without_weights
from decode_worker.service import DecodeService
from decode_worker.vllm_client import VllmChunk, VllmClient, parse_event, request_body
from decode_worker.vllm_engine import fallback_stats
from kvfuse.blend import Mode
from kvfuse.errors import CodecError, ServiceUnavailableError
from kvfuse.model.sampling import SamplingParams
from kvfuse.prefill import PrefillRequest
from kvfuse.procs import free_port
from kvfuse.segments import PromptSegments
from kvfuse.settings import Settings

SEGMENTS = PromptSegments(prefix_ids=(1, 2), chunk_ids=((3, 4), (5,)), query_ids=(6, 7))


def generation(**sampling: object) -> GenerationRequest:
    params = SamplingParams(**sampling)  # type: ignore[arg-type]
    return GenerationRequest(PrefillRequest("r1", SEGMENTS, Mode.BLEND, None, params), (".",))


def test_request_body_sends_the_token_ids_and_stops_as_the_embedded_decoder() -> None:
    request = generation(max_tokens=9, temperature=0.5, top_p=0.9, seed=7, stop_token_ids=(5,))
    params = {"kvfuse_handoff": {"id": "h", "address": "127.0.0.1:1"}}
    body = request_body(request, "served", (2, 0, 5), params)
    assert body["prompt"] == [1, 2, 3, 4, 5, 6, 7] and body["model"] == "served"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == (
        9,
        0.5,
        0.9,
        7,
    )
    assert body["stop"] == ["."] and body["stop_token_ids"] == [5, 2, 0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["kv_transfer_params"] == params
    plain = request_body(generation(ignore_eos=True), "served", (2, 0), None)
    assert plain["stop_token_ids"] == [] and plain["ignore_eos"] is True
    assert "kv_transfer_params" not in plain and "seed" not in plain


def test_fallback_stats_say_vllm_computed_every_token() -> None:
    stats = fallback_stats(generation(), "prefill_unavailable")
    assert (stats.num_prompt_tokens, stats.num_computed_tokens, stats.num_cached_tokens) == (
        7,
        7,
        0,
    )
    assert (stats.num_chunks, stats.fallback) == (2, "prefill_unavailable")


def chunk_line(choices: list[object], **extra: object) -> str:
    return "data: " + json.dumps({"id": "cmpl-1", "choices": choices, **extra})


def test_stream_events_are_parsed() -> None:
    text = chunk_line([{"index": 0, "text": "Hi", "finish_reason": None}])
    assert parse_event(text) == VllmChunk("Hi", None)
    last = chunk_line([{"index": 0, "text": "", "finish_reason": "length"}])
    assert parse_event(last) == VllmChunk("", "length")
    usage = chunk_line([], usage={"prompt_tokens": 7, "completion_tokens": 3})
    assert parse_event(usage) == VllmChunk(num_completion_tokens=3)
    assert parse_event("data: [DONE]") is None and parse_event("") is None
    assert parse_event(": keep-alive") is None


def test_bad_events_raise() -> None:
    with pytest.raises(ServiceUnavailableError, match="vLLM failed the request: boom"):
        parse_event('data: {"error": {"message": "boom", "code": 500}}')
    for bad in ("data: {not json", 'data: {"choices": 3}', 'data: {"id": 1}'):
        with pytest.raises(CodecError, match="no completion chunk"):
            parse_event(bad)


def test_connect_gives_up_with_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailableError, match=f"vLLM at {url} did not answer"):
        VllmClient.connect(url, "", timeout_s=0.1)


def test_unreachable_vllm_is_503(smollm_dir: Path, cache_dir: Path) -> None:
    """A vLLM that went away after start-up: the request fails with 503 (the prefill worker,
    down too, only makes it fall back)."""
    vllm_url = f"http://127.0.0.1:{free_port()}"
    prefill_url = f"127.0.0.1:{free_port()}"
    config = DecodeConfig(engine="vllm", vllm_url=vllm_url, prefill_url=prefill_url)
    served = load_without_weights(Settings(model=str(smollm_dir), cache_dir=cache_dir))
    backend = remote_backend(prefill_url, "", 5.0)
    vllm = VllmClient(vllm_url, "served", 4096, timeout_s=5.0)
    with ThreadServer(create_app(DecodeService(config, served, backend, vllm))) as url:
        body = {"messages": rag_messages(), "max_tokens": 4, "temperature": 0}
        for stream in (False, True):
            response = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream})
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["type"] == "ServiceUnavailableError" and vllm_url in error["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "is not healthy" in health.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 4096
