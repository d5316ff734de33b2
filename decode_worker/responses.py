"""Response bodies in the OpenAI/vLLM shapes: completions, chat completions, their SSE chunks."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from decode_worker.sequence import GenerationRequest, SequenceOutput
from kvfuse.prefill import PrefillStats


@dataclass
class Completion:
    """The outputs of one sequence gathered so far."""

    request: GenerationRequest
    text: str = ""
    num_generated_tokens: int = 0
    finish_reason: str | None = None
    prefill: PrefillStats | None = None
    ttft_s: float | None = None
    error: BaseException | None = None

    def add(self, out: SequenceOutput) -> None:
        self.text += out.text
        self.num_generated_tokens = max(self.num_generated_tokens, out.num_generated_tokens)
        if out.prefill is not None:  # with the first token, or later (engine vllm)
            self.prefill = out.prefill
        if out.ttft_s is not None:
            self.ttft_s = out.ttft_s
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason.value
        self.error = out.error or self.error

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def usage(self) -> dict[str, Any]:
        """OpenAI usage plus `kvfuse`: what the prefill reused and computed."""
        num_prompt = self.request.num_prompt_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": num_prompt,
            "completion_tokens": self.num_generated_tokens,
            "total_tokens": num_prompt + self.num_generated_tokens,
        }
        stats = self.prefill
        if stats is not None:
            usage["kvfuse"] = {
                "mode": self.request.prefill.mode.value,
                # what the blend used (the request's, the controller's or the default)
                "recompute_ratio": stats.recompute_ratio if stats.ratio_source else None,
                "ratio_source": stats.ratio_source or None,
                "cached_tokens": stats.num_cached_tokens,
                "recomputed_tokens": stats.num_recomputed_tokens,
                "computed_tokens": stats.num_computed_tokens,
                "chunks": stats.num_chunks,
                "chunk_hits": stats.num_chunk_hits,
                "memory_hits": stats.num_memory_hits,
                "precomputed_tokens": stats.num_precomputed_tokens,
                "chunks_precomputed": stats.num_chunks_precomputed,
                "ttft_s": self.ttft_s,
                "prefill_s": stats.prefill_s,
                "fallback": stats.fallback or None,
            }
        return usage


@dataclass(frozen=True)
class ResponseFormat:
    """How one endpoint shapes its responses. `chat` picks chat.completion vs text_completion.

    Attributes:
        response_id: `cmpl-<X-Request-Id>` or `chatcmpl-<X-Request-Id>`, as vLLM names them.
    """

    chat: bool
    request_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def response(self, result: Completion) -> dict[str, Any]:
        """The non-streamed body."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice["finish_reason"] = result.finish_reason
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": result.usage()}

    def head_chunks(self) -> list[dict[str, Any]]:
        """Chunks sent before any text: chat streams open with the assistant role."""
        if not self.chat:
            return []
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def text_chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return self._chunk({"content": text} if text else {}, finish_reason)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, result: Completion) -> dict[str, Any]:
        """The last chunk when the client asked for `stream_options.include_usage`."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": result.usage()}

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def _head(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
        }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
