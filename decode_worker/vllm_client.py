"""HTTP to a vLLM OpenAI server: its model card at start-up, `/health`, one streamed completion
(and the body a request becomes).

vLLM streams a completion as server-sent events: `data: {…}` chunks whose `choices[0]` holds a
text delta and, on the last one, the finish reason; with `stream_options.include_usage` a chunk
with no choices and the token counts; then `data: [DONE]`. Errors become kvfuse errors here:
vLLM out of reach or failing → ServiceUnavailableError (503), a request vLLM refuses →
InvalidRequestError (400), an event that is not what vLLM sends → CodecError (502).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from decode_worker.sequence import GenerationRequest
from kvfuse.errors import CodecError, InvalidRequestError, ServiceUnavailableError

HEALTH_TIMEOUT_S = 2.0  # a /health probe; the route answering it must not hang on vLLM
_CONNECT_POLL_S = 1.0
_DONE = "[DONE]"


@dataclass(frozen=True)
class VllmChunk:
    """One event of vLLM's stream.

    Attributes:
        text: the text delta ("" for a token that shows no text yet, or a usage chunk).
        finish_reason: on the last choice chunk: "stop", "length" or "abort".
        num_completion_tokens: on the usage chunk only: tokens vLLM generated.
    """

    text: str = ""
    finish_reason: str | None = None
    num_completion_tokens: int | None = None


def parse_event(line: str) -> VllmChunk | None:
    """One line of vLLM's SSE stream; None for a line that carries no chunk (blank, a comment,
    `[DONE]`).

    Raises:
        ServiceUnavailableError: vLLM streamed an error event.
        CodecError: the line is not a completion chunk.
    """
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == _DONE:
        return None
    try:
        payload = json.loads(data)
        if "error" in payload:
            raise ServiceUnavailableError(f"vLLM failed the request: {_message(payload)}")
        usage = payload.get("usage") or {}
        choices = payload["choices"]
        if not choices:
            return VllmChunk(num_completion_tokens=int(usage["completion_tokens"]))
        choice = choices[0]
        return VllmChunk(str(choice.get("text") or ""), choice.get("finish_reason"))
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise CodecError(f"vLLM sent an event that is no completion chunk: {data[:200]!r}") from exc


def _message(payload: Any) -> str:
    """The message of an OpenAI-shaped error body, or the body itself."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error if error is not None else payload)[:500]


def request_body(
    request: GenerationRequest,
    model: str,
    eos_token_ids: tuple[int, ...],
    kv_transfer_params: dict[str, Any] | None,
) -> dict[str, Any]:
    """vLLM's streamed `/v1/completions` body for a request: its prompt as token ids, its
    sampling, and its stops as the embedded decoder stops (EOS and end-of-turn tokens unless
    `ignore_eos`, the request's stop tokens and strings)."""
    sampling = request.prefill.sampling
    stop_ids = [*sampling.stop_token_ids, *(() if sampling.ignore_eos else eos_token_ids)]
    body: dict[str, Any] = {
        "model": model,
        "prompt": request.prefill.segments.token_ids,
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "stop": list(request.stop),
        "stop_token_ids": list(dict.fromkeys(stop_ids)),
        "ignore_eos": sampling.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if kv_transfer_params is not None:
        body["kv_transfer_params"] = kv_transfer_params
    return body


class VllmClient:
    """One vLLM OpenAI server. `connect` (blocks until it answers), then `stream` from one
    event loop, `healthy` from any thread, `aclose` on that loop when done.

    Attributes:
        url: base URL, e.g. `http://127.0.0.1:8100`.
        model: the model name vLLM serves (sent as `model`).
        max_model_len: vLLM's context limit (prompt + generation).
    """

    def __init__(self, url: str, model: str, max_model_len: int, timeout_s: float) -> None:
        self.url, self.model, self.max_model_len = url.rstrip("/"), model, max_model_len
        # No pool limit: the engine's admission bounds the requests in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, limits=limits)

    @classmethod
    def connect(cls, url: str, model: str, timeout_s: float) -> VllmClient:
        """Asks vLLM's `/v1/models` until it answers (vLLM may still be starting).

        Args:
            model: the served name to use; "" takes vLLM's first (normally only) model.

        Raises:
            ServiceUnavailableError: no answer within `timeout_s`, or no such model.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=HEALTH_TIMEOUT_S)
                response.raise_for_status()
                cards = response.json()["data"]
                break
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                if time.monotonic() > deadline:
                    raise ServiceUnavailableError(
                        f"vLLM at {url} did not answer /v1/models in {timeout_s:.0f} s: {exc}"
                    ) from exc
                time.sleep(_CONNECT_POLL_S)
        card = next((c for c in cards if not model or c.get("id") == model), None)
        if card is None:
            served = [c.get("id") for c in cards]
            raise ServiceUnavailableError(f"vLLM at {url} serves {served}, not {model!r}")
        return cls(url, str(card["id"]), int(card.get("max_model_len") or 1 << 62), timeout_s)

    def healthy(self) -> bool:
        """Whether vLLM's `/health` answers 200 (blocks up to HEALTH_TIMEOUT_S)."""
        try:
            return httpx.get(f"{self.url}/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    async def stream(self, body: Mapping[str, Any], request_id: str) -> AsyncIterator[VllmChunk]:
        """POSTs a streamed `/v1/completions` and yields its chunks. Leaving the loop early
        (or cancelling the task) closes the connection, and vLLM aborts the request.

        Raises:
            ServiceUnavailableError: vLLM out of reach, too slow (`timeout_s` between two
                pieces), failing, or the stream cut short.
            InvalidRequestError: vLLM refused the request (400).
            CodecError: a malformed event.
        """
        headers = {"X-Request-Id": request_id}
        try:
            async with self._http.stream(
                "POST", "/v1/completions", json=dict(body), headers=headers
            ) as response:
                if response.status_code != 200:
                    await self._raise_status(response)
                async for line in response.aiter_lines():
                    chunk = parse_event(line)
                    if chunk is not None:
                        yield chunk
        except httpx.HTTPError as exc:
            raise ServiceUnavailableError(f"vLLM at {self.url}: {exc!r}") from exc

    async def _raise_status(self, response: httpx.Response) -> None:
        raw = await response.aread()
        try:
            message = _message(json.loads(raw))
        except ValueError:
            message = raw[:500].decode(errors="replace")
        if response.status_code == 400:
            raise InvalidRequestError(f"vLLM refused the request: {message}")
        raise ServiceUnavailableError(f"vLLM answered {response.status_code}: {message}")

    async def aclose(self) -> None:
        await self._http.aclose()
