"""Prompt segments: prefix | chunks | query, each tokenized on its own.

Segment 0 is the prefix (reused exactly), the last is the query (always computed), the ones
between are chunks whose KV is reused wherever they land. A chunk's tokens — and so its key —
never depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvfuse.errors import InvalidRequestError
from kvfuse.model.tokenizer import Tokenizer

DEFAULT_SEPARATOR = "<|kvfuse_sep|>"
# Appended to each document inside a chat message so documents do not run together.
DOCUMENT_SUFFIX = "\n\n"


@dataclass(frozen=True)
class PromptSegments:
    """Token ids of one prompt, cut at segment boundaries."""

    prefix_ids: tuple[int, ...]
    chunk_ids: tuple[tuple[int, ...], ...]
    query_ids: tuple[int, ...]

    @property
    def token_ids(self) -> list[int]:
        ids = list(self.prefix_ids)
        for chunk in self.chunk_ids:
            ids.extend(chunk)
        return ids + list(self.query_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + sum(map(len, self.chunk_ids)) + len(self.query_ids)

    @property
    def chunk_offsets(self) -> list[int]:
        """Position of each chunk's first token in the prompt."""
        offsets, pos = [], len(self.prefix_ids)
        for chunk in self.chunk_ids:
            offsets.append(pos)
            pos += len(chunk)
        return offsets


def split_text(text: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """Splits a prompt at `separator`, which is removed. Raises on empty separator."""
    if not separator:
        raise InvalidRequestError("segment separator must not be empty")
    return text.split(separator)


def build_prompt(
    tokenizer: Tokenizer, segments: Sequence[str], chat: bool = True
) -> PromptSegments:
    """Tokenizes segments one by one.

    With `chat`, segments are [system, document..., question] (or just [question]) and the
    model's chat template frames them: the prefix is everything up to the user message, the
    documents are the chunks, the query is the question plus the assistant header. Without it,
    segments are [prefix, chunk..., query] as raw text.

    Raises:
        InvalidRequestError: no segments, or an empty document/query.
    """
    texts = list(segments)
    if not texts:
        raise InvalidRequestError("prompt has no segments")
    _check_not_empty(texts)
    if chat:
        system = texts[0] if len(texts) > 1 else None
        head, tail = tokenizer.chat_frame(system or None)
        prefix, chunks, query = head, [d + DOCUMENT_SUFFIX for d in texts[1:-1]], texts[-1] + tail
    else:
        prefix = texts[0] if len(texts) > 1 else ""
        chunks, query = texts[1:-1], texts[-1]
    prefix_ids = tokenizer.encode(prefix) if prefix else []
    if tokenizer.add_bos and tokenizer.bos_token_id is not None:
        prefix_ids.insert(0, tokenizer.bos_token_id)
    return PromptSegments(
        prefix_ids=tuple(prefix_ids),
        chunk_ids=tuple(tuple(tokenizer.encode(c)) for c in chunks),
        query_ids=tuple(tokenizer.encode(query)),
    )


def _check_not_empty(texts: list[str]) -> None:
    if not texts[-1].strip():
        raise InvalidRequestError("the query (last segment) is empty")
    for idx, text in enumerate(texts[1:-1], start=1):
        if not text.strip():
            raise InvalidRequestError(f"segment {idx} is empty")
