"""The decode worker as a real process on 127.0.0.1, driven by the OpenAI client and httpx.

Real SmolLM2, fp32, greedy, small max_tokens. One server for the module.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from decode_helpers import (
    DOCS,
    KVFUSE_SERVE_DECODE,
    QUESTION,
    SEP,
    SYSTEM,
    TOKEN,
    DecodeProcess,
    poll,
    rag_messages,
)
from prometheus_client.parser import text_string_to_metric_families

from kvfuse import cli
from kvfuse.client.warm import warm_documents
from kvfuse.errors import AuthError, InvalidRequestError, ServiceUnavailableError

MODEL = "SmolLM2-135M-Instruct"
GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def server(smollm_dir: Path) -> Iterator[DecodeProcess]:
    """One `kvfuse serve decode` (local prefill) with a bearer token; smollm_dir converts the
    weights first."""
    args = ["--token", TOKEN, "--num-threads", "1", "--max-batch", "4"]
    proc = DecodeProcess(args, command=KVFUSE_SERVE_DECODE).start()
    yield proc
    proc.stop()
    assert "Application shutdown complete" in proc.log_tail(), proc.log_tail()


@pytest.fixture(scope="module")
def client(server: DecodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: DecodeProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        yield c


def chat(client: openai.OpenAI, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)  # type: ignore[arg-type]


def kvfuse_usage(response: Any) -> dict[str, Any]:
    return dict(response.usage.model_extra["kvfuse"])


def scrape(http: httpx.Client) -> tuple[set[str], dict[str, float]]:
    """/metrics parsed: family names, and every sample by name (labels dropped, summed)."""
    text = httpx.get(f"{str(http.base_url).rstrip('/')}/metrics").text
    names: set[str] = set()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return names, samples


def metric_samples(http: httpx.Client) -> dict[str, float]:
    return scrape(http)[1]


def test_models_in_vllm_shape(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert {k: card[k] for k in ("id", "object", "owned_by", "parent")} == {
        "id": MODEL,
        "object": "model",
        "owned_by": "kvfuse",
        "parent": None,
    }
    assert card["max_model_len"] == 8192 and card["root"] and isinstance(card["created"], int)


def test_health_and_metrics_need_no_token(server: DecodeProcess) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


BAD_AUTH = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]


@pytest.mark.parametrize("headers", BAD_AUTH)
def test_missing_or_wrong_token_is_401(server: DecodeProcess, headers: dict[str, str]) -> None:
    paths = ("/v1/completions", "/tokenize", "/kvfuse/warm")
    for method, path in (("GET", "/v1/models"), *(("POST", path) for path in paths)):
        response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
        assert response.status_code == 401, path
        error = response.json()["error"]
        assert error["code"] == 401 and error["type"] == "AuthenticationError" and error["message"]


def test_streamed_and_non_streamed_are_identical(client: openai.OpenAI) -> None:
    full: dict[str, Any] = {"extra_body": {"kvfuse": {"mode": "full_prefill"}}}  # same KV
    whole = chat(client, rag_messages(), **full, **GREEDY)
    chunks = list(chat(client, rag_messages(), stream=True, **full, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed and streamed
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason
    prompt = f"{SYSTEM}\n{SEP}{DOCS[0]}{SEP}Where was Marla born? Answer:"
    text = client.completions.create(model=MODEL, prompt=prompt, **full, **GREEDY)
    stream = client.completions.create(model=MODEL, prompt=prompt, stream=True, **full, **GREEDY)
    parts = list(stream)
    assert text.choices[0].text == "".join(p.choices[0].text for p in parts)
    assert text.usage is not None and text.usage.completion_tokens == 12


def test_blend_at_ratio_one_gives_the_full_prefill_tokens(client: openai.OpenAI) -> None:
    def answer(mode: str, ratio: float | None = None) -> Any:
        kvfuse: dict[str, Any] = {"mode": mode}
        if ratio is not None:
            kvfuse["recompute_ratio"] = ratio
        return chat(client, rag_messages(), extra_body={"kvfuse": kvfuse}, **GREEDY)

    full = answer("full_prefill")
    answer("full_reuse")  # stores the documents
    blend = answer("blend", 1.0)
    usage = kvfuse_usage(blend)
    assert usage["chunk_hits"] == 3 and usage["chunks"] == 3 and usage["mode"] == "blend"
    assert blend.choices[0].message.content == full.choices[0].message.content
    assert kvfuse_usage(full)["cached_tokens"] == 0


def test_documents_in_another_order_hit_the_cache(client: openai.OpenAI) -> None:
    docs = (DOCS[2] + " He has two cats.", DOCS[0] + " Her sister is Ilse.", DOCS[1] + " Tolls.")
    first = chat(client, rag_messages(docs), **GREEDY)
    again = chat(client, rag_messages(docs[::-1], "What does Edwin Palk do?"), **GREEDY)
    assert kvfuse_usage(first)["chunk_hits"] == 0
    usage = kvfuse_usage(again)
    assert usage["chunk_hits"] == 3 and usage["fallback"] is None and usage["ttft_s"] > 0
    assert again.usage is not None
    assert usage["cached_tokens"] + usage["computed_tokens"] == again.usage.prompt_tokens
    assert 0 < usage["recomputed_tokens"] < usage["cached_tokens"]


def test_warmed_documents_hit_on_their_first_request(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    docs = ("Orla Venn keeps bees in Marrowby.", "The Sallow ferry runs at dawn.", "Pim is six.")
    warm = http.post("/kvfuse/warm", json={"model": MODEL, "system": SYSTEM, "documents": docs})
    assert warm.status_code == 200, warm.text
    body = warm.json()
    assert (body["documents"], body["objects"], body["present"] + body["stored"]) == (3, 4, 4)
    assert body["stored"] >= 3 and body["computed_tokens"] > 0  # the prefix may be stored
    again = http.post("/kvfuse/warm", json={"system": SYSTEM, "documents": docs[::-1]}).json()
    assert (again["present"], again["stored"], again["computed_tokens"]) == (4, 0, 0)
    answer = chat(client, rag_messages(docs[1:] + docs[:1], "Who keeps bees?"), max_tokens=2)
    usage = kvfuse_usage(answer)
    assert usage["chunk_hits"] == 3 and usage["chunks_precomputed"] == 0
    raw = {"system": "Notes:", "documents": docs[:2], "chat": False}
    assert http.post("/kvfuse/warm", json=raw).json()["stored"] >= 2  # another framing
    prompt = SEP.join(["Notes:", docs[1], docs[0], "Q: who keeps bees? A:"])
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert kvfuse_usage(completion)["chunk_hits"] == 2


def test_warm_client_and_command_line(
    server: DecodeProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = ("Quill Arden sails to Fenmoor.", "Fenmoor has a salt market.", "Tarn is a dog.")
    totals = warm_documents(server.url, docs, SYSTEM, token=TOKEN, batch=2)  # two calls
    assert (totals.num_objects, totals.num_present + totals.num_stored) == (5, 5)
    assert totals.num_stored >= 3 and totals.num_computed_tokens > 0 and totals.num_failed == 0
    files = [tmp_path / f"doc{i}.txt" for i in range(2)]
    for path, doc in zip(files, ("Ulla Brink fixes clocks.", "Brink Lane is short."), strict=True):
        path.write_text(doc)
    args = ["warm", "--url", server.url, "--token", TOKEN, "--system", SYSTEM, *map(str, files)]
    assert cli.main(args) == 0
    assert "2 documents: 2 objects stored, 1 already present" in capsys.readouterr().out
    with pytest.raises(AuthError):
        warm_documents(server.url, docs, SYSTEM, token="wrong")
    with pytest.raises(InvalidRequestError, match="empty"):
        warm_documents(server.url, ["fine", " "], SYSTEM, token=TOKEN)
    with pytest.raises(ServiceUnavailableError):
        warm_documents("http://127.0.0.1:1", docs, SYSTEM, timeout_s=5)
    assert cli.main(["warm", "--url", server.url, str(tmp_path / "missing.txt")]) == 2


def test_explicit_segments_match_the_separator(client: openai.OpenAI) -> None:
    segments = {"segments": [SYSTEM, *DOCS, QUESTION], "mode": "full_prefill"}
    ignored = [{"role": "user", "content": "ignored"}]
    explicit = chat(client, ignored, extra_body={"kvfuse": segments}, **GREEDY)
    split = chat(client, rag_messages(), extra_body={"kvfuse": {"mode": "full_prefill"}}, **GREEDY)
    assert explicit.choices[0].message.content == split.choices[0].message.content
    assert explicit.usage is not None and split.usage is not None
    assert explicit.usage.prompt_tokens == split.usage.prompt_tokens


def test_request_id_is_echoed_and_names_the_completion(http: httpx.Client) -> None:
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    response = http.post("/v1/completions", json=body, headers={"X-Request-Id": "req-42"})
    assert response.headers["X-Request-Id"] == "req-42"
    assert response.json()["id"] == "cmpl-req-42"
    generated = http.post("/v1/completions", json=body)
    assert generated.json()["id"] == f"cmpl-{generated.headers['X-Request-Id']}"
    error = http.post("/v1/completions", json={}, headers={"X-Request-Id": "req-43"})
    assert error.status_code == 400 and error.headers["X-Request-Id"] == "req-43"


def test_tokenize_counts_the_prompt_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    tokens = http.post("/tokenize", json={"messages": rag_messages()}).json()
    assert tokens["max_model_len"] == 8192 and tokens["count"] == len(tokens["tokens"])
    answer = chat(client, rag_messages(), max_tokens=1, temperature=0)
    assert answer.usage is not None and answer.usage.prompt_tokens == tokens["count"]
    raw = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert raw["count"] == 2


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    full = chat(client, rag_messages(), **GREEDY).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    cut = chat(client, rag_messages(), stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.index(stop)]


def test_seeded_sampling_is_repeatable(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"temperature": 0.9, "top_p": 0.9, "seed": 11, "max_tokens": 10}
    a = chat(client, rag_messages(), **kwargs).choices[0].message.content
    b = chat(client, rag_messages(), stream=True, **kwargs)
    assert a == "".join(c.choices[0].delta.content or "" for c in b if c.choices)


BAD_INPUTS = [
    ("/v1/completions", b"{not json", 400, "invalid JSON"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "   "}, 400, "empty"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"max_tokens": 2}, 400, "messages"),
    ("/v1/completions", {"model": "gpt-5", "prompt": "hi"}, 404, "gpt-5"),
    ("/v1/chat/completions", {"model": "nope", "messages": rag_messages()}, 404, "nope"),
    ("/v1/completions", {"prompt": "word " * 9000}, 400, "8192"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 9000}, 400, "8192"),
    ("/v1/completions", {"prompt": "hi", "kvfuse": {"recompute_ratio": 1.5}}, 400, "ratio"),
    ("/v1/completions", {"prompt": "hi", "kvfuse": {"recompute_ratio": -0.1}}, 400, "ratio"),
    ("/v1/completions", {"prompt": "hi", "kvfuse": {"mode": "turbo"}}, 400, "mode"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n=1"),
    ("/v1/chat/completions", {"messages": rag_messages(), "n": 3}, 400, "n=1"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "user"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/kvfuse/warm", {"documents": []}, 400, "documents"),
    ("/kvfuse/warm", {"documents": ["a", " "]}, 400, "empty"),
    ("/kvfuse/warm", {"documents": ["a"] * 257}, 400, "documents"),
    ("/kvfuse/warm", {"documents": ["word " * 9000]}, 400, "8192"),
    ("/kvfuse/warm", {"model": "nope", "documents": ["a"]}, 404, "nope"),
    # hostile input: limits, non-finite numbers, lone surrogates, max_tokens past the context
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400,
     "max_tokens is 1000000000000, more than the 8191 tokens the model's context of 8192"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400,
     "temperature: nan is not a finite number"),
    ("/v1/chat/completions", b'{"messages": [], "kvfuse": {"recompute_ratio": NaN}}', 400,
     "kvfuse.recompute_ratio: nan is not a finite number"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": -Infinity}', 400, "-inf is not a finite"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', 400, "prompt: the text holds a lone UTF-16"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages.0.content: the text holds a lone UTF-16 surrogate (\\ud800)"),
    ("/tokenize", b'{"prompt": "a \\udfff"}', 400, "lone UTF-16 surrogate"),
    ("/kvfuse/warm", b'{"documents": ["\\ud800"]}', 400, "documents.0: the text holds"),
    ("/v1/completions", {"prompt": SEP.join(["d"] * 2000)}, 400,
     "the prompt has 2000 segments (prefix, documents and query), more than the limit of 128"),
    ("/v1/chat/completions", {"messages": rag_messages(["d"] * 2000)}, 400, "2002 segments"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}] * 257}, 400,
     "messages: at most 256 messages in a chat (got 257)"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x" * 257]}, 400, "at most 256 characters"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "status", "needle"), BAD_INPUTS)
def test_bad_input_gets_a_clear_error(
    http: httpx.Client, path: str, body: Any, status: int, needle: str
) -> None:
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and needle in error["message"], error
    assert set(error) >= {"message", "type", "code"}


def test_server_keeps_serving_after_bad_input(client: openai.OpenAI, http: httpx.Client) -> None:
    http.post("/v1/completions", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    http.post("/v1/chat/completions", json={"messages": "not a list"})
    assert http.get("/health").status_code == 200
    assert chat(client, rag_messages(), max_tokens=2, temperature=0).choices[0].message.content


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, n=2)


def test_metrics_have_the_router_and_kvfuse_names(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    chat(client, rag_messages(), max_tokens=3, temperature=0)
    families, samples = scrape(http)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:time_to_first_token_seconds",
        "vllm:prompt_tokens",  # counters: the samples are <name>_total
        "vllm:generation_tokens",
        "kvfuse_decode_requests",
        "kvfuse_decode_ttft_seconds",
        "kvfuse_decode_prompt_tokens",
        "kvfuse_decode_generation_tokens",
        "kvfuse_decode_cached_tokens",
        "kvfuse_decode_recomputed_tokens",
        "kvfuse_decode_chunk_hits",
        "kvfuse_decode_chunks",
        "kvfuse_decode_fallbacks",
        "kvfuse_decode_aborted_requests",
    ):
        assert name in families, name
    assert samples["vllm:prompt_tokens_total"] > 0 and samples["vllm:num_requests_waiting"] == 0
    assert samples["vllm:time_to_first_token_seconds_count"] >= 1
    assert samples["vllm:generation_tokens_total"] >= 3
    assert samples["kvfuse_decode_chunk_hits_total"] >= 3


def _stream_tokens(url: str, body: dict[str, Any], events: list[tuple[str, float]]) -> None:
    """Reads an SSE completion stream, noting ('token', t) per chunk and ('done', t) at the end."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{url}/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=300) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                events.append(("done" if choice["finish_reason"] else "token", time.monotonic()))


def test_short_request_finishes_before_a_long_one(
    server: DecodeProcess, http: httpx.Client
) -> None:
    """No head-of-line blocking: a short request joins the running batch and leaves first."""
    long_body = {
        "prompt": "Count: 1, 2, 3,",
        "max_tokens": 60,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    events: list[tuple[str, float]] = []
    reader = threading.Thread(target=_stream_tokens, args=(server.url, long_body, events))
    reader.start()
    poll(lambda: len(events) >= 2, 120, "the long request to be decoding")
    short = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0})
    short_done_s = time.monotonic()
    reader.join(timeout=300)
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    long_done_s = [t for kind, t in events if kind == "done"]
    assert long_done_s and long_done_s[0] > short_done_s
    assert len(events) == 60  # every long token arrived, one chunk each


def test_client_disconnect_frees_its_sequence(server: DecodeProcess, http: httpx.Client) -> None:
    aborted = metric_samples(http)["kvfuse_decode_aborted_requests_total"]
    body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    # the connection is closed now, mid-generation

    def released() -> bool:
        samples = metric_samples(http)
        return (
            samples["kvfuse_decode_aborted_requests_total"] > aborted
            and samples["vllm:num_requests_running"] == 0
            and samples["vllm:kv_cache_usage_perc"] == 0
        )

    poll(released, 60, "the aborted sequence to be freed")
