"""Request bodies of the OpenAI/vLLM HTTP API (pydantic), with kvfuse's `kvfuse` extension.

Only types and ranges live here; what a valid combination is (n, segments vs prompt, limits)
is checked in `decode_worker.prompts`, limits in `decode_worker.limits`. Unknown fields are
ignored, as vLLM does. A number must be finite: NaN and ±Infinity (which Python's JSON reads)
are refused as "not a finite number" rather than compared with a range.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvfuse.blend import Mode

MAX_SEED = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class KvfuseOptions(BaseModel):
    """The `kvfuse` extension object.

    Attributes:
        segments: the prompt as segments; with chat: [system, document…, question], without:
            [prefix, chunk…, query]. Replaces the prompt / messages.
        mode: how the prompt KV is built.
        recompute_ratio: fraction of reused tokens the blend recomputes.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    segments: list[str] | None = None
    mode: Mode | None = None
    recompute_ratio: float | None = Field(default=None, ge=0.0, le=1.0)


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    kvfuse: KvfuseOptions | None = None


class CompletionRequest(SamplingBody):
    """`POST /v1/completions`. A prompt is one string (or a one-element list, or token ids)."""

    prompt: str | list[str] | list[int] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingBody):
    """`POST /v1/chat/completions`. `max_completion_tokens` is OpenAI's newer `max_tokens`."""

    messages: list[ChatMessage] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None


class TokenizeRequest(_Body):
    """`POST /tokenize` (vLLM): a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    kvfuse: KvfuseOptions | None = None


class WarmRequest(_Body):
    """`POST /kvfuse/warm`: store documents' KV before the questions about them arrive.

    The documents are framed as the requests that will carry them: with `chat`, documents in
    the user message of a chat whose system message is `system` (several system messages are
    joined by a blank line); without, `/v1/completions` segments [system, document…, query].
    """

    model: str | None = None
    documents: list[str] = Field(min_length=1)  # at most `max_warm_documents`
    system: str = ""
    chat: bool = True
