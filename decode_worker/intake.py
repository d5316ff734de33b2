"""Request bodies, from bytes to a validated, tokenized request, on threads of their own.

Parsing, validating and tokenizing a large body takes from milliseconds to seconds; on the
event loop it would stall every other request, /health and /metrics included. Here it runs on
a bounded pool of worker threads (`prepare_threads`), apart from the pool the sync routes use,
and the checks that are cheap before validation and costly after it come first
(`RequestLimits.check_parsed`): validation and JSON parsing hold the GIL while they run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from decode_worker.limits import RequestLimits
from decode_worker.prompts import PromptBuilder
from decode_worker.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    WarmRequest,
)
from decode_worker.sequence import GenerationRequest
from kvfuse.errors import InvalidRequestError
from kvfuse.segments import PromptSegments

B = TypeVar("B", bound=BaseModel)
T = TypeVar("T")
# How a lone surrogate can get into a parsed string: a \uD800-\uDFFF escape, or UTF-8 bytes
# of one (json decodes bytes with "surrogatepass"). Paired escapes decode to one character.
_SURROGATE_SIGNS = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_body(model: type[B], raw: bytes, limits: RequestLimits) -> B:
    """`raw` as a `model`.

    Raises:
        InvalidRequestError: not JSON, a string that is not valid Unicode, a limit passed.
        RequestValidationError: a field of the wrong type or out of its range.
    """
    try:
        value = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise InvalidRequestError(f"invalid JSON body: {exc}") from None
    except RecursionError:
        raise InvalidRequestError("invalid JSON body: nested too deeply") from None
    if _SURROGATE_SIGNS.search(raw):
        check_unicode(value)
    limits.check_parsed(value)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def check_unicode(value: object) -> None:
    """Raises InvalidRequestError naming the first string (or key) of a parsed JSON value that
    holds a lone UTF-16 surrogate, which no text can encode."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                stack.extend([(path, key), (_join(path, key), child)])
        elif isinstance(item, list):
            stack.extend((_join(path, str(i)), child) for i, child in enumerate(item))
        elif isinstance(item, str) and (found := _SURROGATE.search(item)):
            raise InvalidRequestError(
                f"{path or 'body'}: the text holds a lone UTF-16 surrogate "
                f"(\\u{ord(found.group()):04x}), which is not a character; send characters "
                "outside the Basic Multilingual Plane as a surrogate pair or as UTF-8"
            )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Intake:
    """What the text routes call: body bytes in, validated and tokenized request out, computed
    on at most `threads` worker threads. Errors are raised for `decode_worker.errors`.

    Args:
        check_model: raises when a body names a model this server does not serve.
    """

    def __init__(
        self,
        prompts: PromptBuilder,
        limits: RequestLimits,
        check_model: Callable[[str | None], None],
        threads: int,
    ) -> None:
        self.prompts, self.limits, self.check_model = prompts, limits, check_model
        self._limiter = anyio.CapacityLimiter(threads)

    async def completion(
        self, raw: bytes, request_id: str
    ) -> tuple[CompletionRequest, GenerationRequest]:
        def prepare() -> tuple[CompletionRequest, GenerationRequest]:
            body = self._parse(CompletionRequest, raw)
            return body, self.prompts.completion(body, request_id)

        return await self._run(prepare)

    async def chat(
        self, raw: bytes, request_id: str
    ) -> tuple[ChatCompletionRequest, GenerationRequest]:
        def prepare() -> tuple[ChatCompletionRequest, GenerationRequest]:
            body = self._parse(ChatCompletionRequest, raw)
            return body, self.prompts.chat(body, request_id)

        return await self._run(prepare)

    async def tokenize(self, raw: bytes) -> PromptSegments:
        return await self._run(lambda: self.prompts.tokenize(self._parse(TokenizeRequest, raw)))

    async def warm(self, raw: bytes) -> tuple[WarmRequest, PromptSegments]:
        def prepare() -> tuple[WarmRequest, PromptSegments]:
            body = self._parse(WarmRequest, raw)
            return body, self.prompts.warm(body)

        return await self._run(prepare)

    def _parse(self, model: type[B], raw: bytes) -> B:
        body = parse_body(model, raw, self.limits)
        self.check_model(getattr(body, "model", None))
        return body

    async def _run(self, work: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)
