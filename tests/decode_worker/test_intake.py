"""Request bodies off the event loop: /health answers promptly while hostile bodies are
prepared, and the parsing checks (JSON, lone surrogates, limits before validation).

The load test runs a real `kvfuse serve decode` child process without a token (which must warn
about it) and with small limits so that bodies just under them are cheap to build.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from decode_helpers import KVFUSE_SERVE_DECODE, DecodeProcess, rag_messages
from fastapi.exceptions import RequestValidationError

from decode_worker.config import DecodeConfig
from decode_worker.errors import validation_message
from decode_worker.intake import parse_body
from decode_worker.limits import RequestLimits
from decode_worker.schemas import ChatCompletionRequest, CompletionRequest
from kvfuse.errors import InvalidRequestError, PromptTooLongError

BODY_LIMIT = 1 << 20
HEALTH_BOUND_S = 0.5  # the bound on every /health answer under hostile load
LIMITS = RequestLimits.from_config(DecodeConfig(max_messages=8), 100)


def test_json_errors_are_400s_that_say_where() -> None:
    with pytest.raises(InvalidRequestError, match=r"^invalid JSON body: Expecting"):
        parse_body(CompletionRequest, b"{not json", LIMITS)
    with pytest.raises(InvalidRequestError, match=r"^invalid JSON body: nested too deeply"):
        parse_body(CompletionRequest, b"[" * 100_000, LIMITS)
    with pytest.raises(RequestValidationError) as info:
        parse_body(CompletionRequest, b'{"temperature": NaN, "top_p": Infinity}', LIMITS)
    message = validation_message(info.value)
    assert message == "temperature: nan is not a finite number; top_p: inf is not a finite number"


@pytest.mark.parametrize(
    ("raw", "where", "char"),
    [
        (b'{"prompt": "\\ud800"}', "prompt", "d800"),
        (b'{"prompt": "ok \\udc00 x"}', "prompt", "dc00"),
        (b'{"messages": [{"role": "user", "content": "a\\uDBFF"}]}', "messages.0.content", "dbff"),
        (b'{"stop": ["x", "\xed\xa0\x80"]}', "stop.1", "d800"),  # the UTF-8 bytes of one
        (b'{"logit_bias": {"\\ud800": 1}}', "logit_bias", "d800"),  # a key
    ],
)
def test_lone_surrogates_are_named(raw: bytes, where: str, char: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_body(ChatCompletionRequest, raw, LIMITS)
    message = str(info.value)
    assert message.startswith(f"{where}: the text holds a lone UTF-16 surrogate (\\u{char})")


def test_surrogate_pairs_and_escaped_backslashes_are_text() -> None:
    emoji = json.dumps({"prompt": "smile \U0001f600"}).encode()  # ensure_ascii: \ud83d\ude00
    assert b"\\ud83d\\ude00" in emoji
    assert parse_body(CompletionRequest, emoji, LIMITS).prompt == "smile \U0001f600"
    literal = rb'{"prompt": "C:\\ud800"}'  # a backslash, then "ud800"
    assert parse_body(CompletionRequest, literal, LIMITS).prompt == "C:\\ud800"


def test_costly_limits_are_checked_before_validation() -> None:
    messages = [{"role": "user", "content": "a"}] * 9
    with pytest.raises(
        InvalidRequestError, match=r"^messages: at most 8 messages in a chat \(got 9\)$"
    ):
        parse_body(ChatCompletionRequest, json.dumps({"messages": messages}).encode(), LIMITS)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}] * 9}]
    with pytest.raises(InvalidRequestError, match=r"^messages.0.content: at most 8 text parts"):
        parse_body(ChatCompletionRequest, json.dumps({"messages": parts}).encode(), LIMITS)
    with pytest.raises(PromptTooLongError, match="101 tokens"):
        parse_body(CompletionRequest, json.dumps({"prompt": [1] * 101}).encode(), LIMITS)
    with pytest.raises(InvalidRequestError, match="one prompt per request"):
        parse_body(CompletionRequest, json.dumps({"prompt": ["a"] * 101}).encode(), LIMITS)
    ok = {"messages": messages[:8], "prompt": [1] * 100}
    assert (
        len(parse_body(ChatCompletionRequest, json.dumps(ok).encode(), LIMITS).messages or []) == 8
    )


@pytest.fixture(scope="module")
def server(smollm_dir: Path) -> Iterator[DecodeProcess]:
    """No token; 1 MiB bodies, 64 messages, 512 tokens per segment."""
    args = ["--num-threads", "1", "--max-body-bytes", "1MiB", "--max-messages", "64"]
    args += ["--max-segment-tokens", "512"]
    proc = DecodeProcess(args, command=KVFUSE_SERVE_DECODE).start()
    yield proc
    proc.stop()


def test_a_worker_without_a_token_warns_loudly(server: DecodeProcess) -> None:
    warning = [line for line in server.lines if "unauthenticated" in line]
    assert warning and " WARNING " in warning[0] and "NO AUTH TOKEN" in warning[0], warning


def _padded(body: dict[str, Any], key: str, unit: str, size: int) -> bytes:
    """`body` with `body[key]` grown by `unit`s until the JSON is just under `size` bytes."""
    empty = len(json.dumps({**body, key: ""}).encode())
    return json.dumps({**body, key: unit * ((size - empty - 1) // len(unit))}).encode()


def hostile_bodies() -> list[tuple[str, bytes, int]]:
    """(path, body, expected status): each allowed in size, each costly to prepare."""
    just_under = BODY_LIMIT - 64
    big_text = _padded({"max_tokens": 1}, "prompt", "word ", just_under)
    long_chat = [{"role": "user", "content": "word " * 3000}] * 63 + rag_messages()[1:]
    one_char_messages = [{"role": "user", "content": "a"}] * (BODY_LIMIT // 40)
    docs = ["x"] * (BODY_LIMIT // 6)
    bodies = [
        ("/v1/completions", big_text, 400),  # tokenized whole: prompt too long
        ("/tokenize", _padded({}, "prompt", "word ", just_under), 200),
        ("/v1/chat/completions", json.dumps({"messages": long_chat}).encode(), 400),
        ("/v1/chat/completions", json.dumps({"messages": one_char_messages}).encode(), 400),
        (
            "/v1/completions",
            json.dumps({"prompt": "q", "kvfuse": {"segments": docs}}).encode(),
            400,
        ),
        ("/v1/completions", json.dumps({"prompt": [7] * (BODY_LIMIT // 4)}).encode(), 400),
        ("/kvfuse/warm", json.dumps({"documents": ["word " * 800] * 250}).encode(), 400),
        ("/v1/completions", big_text + b" " * 128, 413),  # over the limit
    ]
    for path, body, status in bodies:
        assert (len(body) <= BODY_LIMIT) == (status != 413), (path, len(body))
    return bodies


def test_health_answers_promptly_while_hostile_bodies_are_prepared(
    server: DecodeProcess,
) -> None:
    bodies = hostile_bodies()
    senders, rounds = 4, 2
    failures: list[str] = []
    refusals_s: list[float] = []
    health_s: list[float] = []

    def send(offset: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            for i in range(rounds * len(bodies)):
                path, body, status = bodies[(i + offset) % len(bodies)]
                start = time.perf_counter()
                response = client.post(path, content=body)
                if status == 413:
                    refusals_s.append(time.perf_counter() - start)
                if response.status_code != status:
                    failures.append(f"{path}: {response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=send, args=(i * 2,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        while any(thread.is_alive() for thread in threads):
            start = time.perf_counter()
            status = client.get("/health").status_code
            health_s.append(time.perf_counter() - start)
            assert status == 200
            assert client.get("/metrics").status_code == 200
    assert not failures, failures
    health_s.sort()
    p50, worst = health_s[len(health_s) // 2], health_s[-1]
    print(f"\n/health under load: {len(health_s)} answers, p50 {p50 * 1000:.1f} ms, "
          f"max {worst * 1000:.1f} ms; 413s: max {max(refusals_s) * 1000:.1f} ms")  # fmt: skip
    assert len(health_s) >= 20 and worst < HEALTH_BOUND_S, health_s[-5:]
    assert len(refusals_s) == senders * rounds and max(refusals_s) < HEALTH_BOUND_S


def test_the_hostile_bodies_get_precise_answers(server: DecodeProcess) -> None:
    want = {
        "/v1/completions": ["prompt has", "segments (prefix, documents and query)", "tokens"],
        "/v1/chat/completions": ["prompt has", "messages: at most 64 messages"],
        "/kvfuse/warm": ["more than the limit of 512 per segment"],
    }
    for path, body, status in hostile_bodies():
        response = httpx.post(f"{server.url}{path}", content=body, timeout=300)
        assert response.status_code == status, response.text[:300]
        if status == 413:
            assert "more than the limit of 1048576" in response.json()["error"]["message"]
        elif status == 400:
            message = response.json()["error"]["message"]
            assert any(needle in message for needle in want[path]), message
