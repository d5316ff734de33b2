"""What one request may ask of the decode worker, and the precise answer when it asks more.

Every check raises InvalidRequestError (400) naming the limit, what was sent and where; the
body size (413) is enforced in `decode_worker.body_limit`. The limits bound the work a request
costs before anything useful happens (parsing, validating, tokenizing) and what it multiplies
downstream (a lookup, a key and a stored object per segment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from decode_worker.config import DecodeConfig
from kvfuse.errors import InvalidRequestError, PromptTooLongError
from kvfuse.segments import PromptSegments


@dataclass(frozen=True)
class RequestLimits:
    """The per-request limits of `DecodeConfig`, with the context resolved.

    Attributes:
        max_body_bytes: largest request body.
        max_messages: most messages in a chat, and most text parts in one message.
        max_segments: most segments in one prompt (prefix + documents + query).
        max_segment_tokens: most tokens in one segment (≤ the context).
        max_prompt_tokens: the context: prompt + generation.
        max_stop_strings, max_stop_chars: most stop strings, most characters in one.
        max_warm_documents: most documents in one warm call.
    """

    max_body_bytes: int
    max_messages: int
    max_segments: int
    max_segment_tokens: int
    max_prompt_tokens: int
    max_stop_strings: int
    max_stop_chars: int
    max_warm_documents: int

    @classmethod
    def from_config(cls, config: DecodeConfig, max_model_len: int) -> RequestLimits:
        """The config's limits for a served context of `max_model_len` tokens
        (`max_segment_tokens` 0 means the context)."""
        per_segment = config.max_segment_tokens or max_model_len
        return cls(
            max_body_bytes=config.max_body_bytes,
            max_messages=config.max_messages,
            max_segments=config.max_segments,
            max_segment_tokens=min(per_segment, max_model_len),
            max_prompt_tokens=max_model_len,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            max_warm_documents=config.max_warm_documents,
        )

    def check_parsed(self, body: object) -> None:
        """The limits a parsed JSON body is checked against before validation, where
        validating first would cost the most: messages (and their parts) and token-id
        prompts. Values of the wrong type are left to validation."""
        if not isinstance(body, dict):
            return
        messages = body.get("messages")
        if isinstance(messages, list):
            self._check_messages(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > self.max_prompt_tokens:
            if prompt and isinstance(prompt[0], int):
                raise PromptTooLongError(len(prompt), self.max_prompt_tokens)
            raise InvalidRequestError(f"send one prompt per request (got a list of {len(prompt)})")

    def _check_messages(self, messages: list[Any]) -> None:
        limit = self.max_messages
        if len(messages) > limit:
            raise InvalidRequestError(
                f"messages: at most {limit} messages in a chat (got {len(messages)})"
            )
        for idx, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and len(content) > limit:
                raise InvalidRequestError(
                    f"messages.{idx}.content: at most {limit} text parts in a message "
                    f"(got {len(content)})"
                )

    def check_segments(self, num_segments: int) -> None:
        """Before tokenizing: the prompt's segment count."""
        if num_segments > self.max_segments:
            raise InvalidRequestError(
                f"the prompt has {num_segments} segments (prefix, documents and query), more "
                f"than the limit of {self.max_segments}"
            )

    def check_segment_tokens(self, segments: PromptSegments) -> None:
        """After tokenizing: each segment's token count."""
        limit = self.max_segment_tokens
        named = [("the prefix", segments.prefix_ids)]
        named += [(f"document {i}", ids) for i, ids in enumerate(segments.chunk_ids, start=1)]
        named.append(("the query", segments.query_ids))
        for name, ids in named:
            if len(ids) > limit:
                raise InvalidRequestError(
                    f"{name} has {len(ids)} tokens, more than the limit of {limit} per segment"
                )

    def check_stop(self, stops: Sequence[str]) -> None:
        if len(stops) > self.max_stop_strings:
            raise InvalidRequestError(
                f"stop: at most {self.max_stop_strings} stop strings (got {len(stops)})"
            )
        for idx, stop in enumerate(stops):
            if len(stop) > self.max_stop_chars:
                raise InvalidRequestError(
                    f"stop.{idx}: a stop string has at most {self.max_stop_chars} characters "
                    f"(got {len(stop)})"
                )

    def check_warm_documents(self, num_documents: int) -> None:
        if num_documents > self.max_warm_documents:
            raise InvalidRequestError(
                f"documents: at most {self.max_warm_documents} documents in a warm call (got "
                f"{num_documents}); send them in batches"
            )
