"""A deterministic RAG serving workload: Musique passages drawn with Zipf popularity, shuffled.

Each request asks one Musique question over `num_docs` distinct passages drawn from the
deduplicated passage pool by a Zipf(s) popularity law, in a random order, so popular chunks
recur in new positions as they do in production RAG. Everything depends only on the seed.
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

from benchmarks.datasets import MUSIQUE_INSTRUCTION, RAG_SYSTEM
from kvfuse.errors import ConfigError
from kvfuse.segments import DEFAULT_SEPARATOR, DOCUMENT_SUFFIX

DEFAULT_ZIPF_S = 1.1
DEFAULT_NUM_DOCS = 6


@dataclass(frozen=True)
class Passage:
    """One retrievable chunk: a Musique passage, rendered `Title: <title>\\n<text>`."""

    title: str
    text: str

    @property
    def document(self) -> str:
        return f"Title: {self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class RagRequest:
    """One request of the workload.

    Attributes:
        index: Position in the workload stream (0-based).
        system: The system prompt (the prefix segment).
        passage_ids: Indices into the passage pool, in prompt order.
        documents: The passages' rendered text, in prompt order.
        question: The user's question (the query segment).
    """

    index: int
    system: str
    passage_ids: tuple[int, ...]
    documents: tuple[str, ...]
    question: str

    @property
    def segments(self) -> list[str]:
        """kvfuse segments: [system, document…, question]."""
        return [self.system, *self.documents, self.question]

    def user_text(self, separator: str | None = None) -> str:
        """The user message: each document plus a blank line, then the question.

        With `separator`, it is put between the parts (kvfuse removes it again); without,
        the text is exactly what kvfuse's chat framing renders from the segments, so a server
        that tokenizes the whole message sees the same content.
        """
        parts = [d + DOCUMENT_SUFFIX for d in self.documents] + [self.question]
        return (separator or "").join(parts)

    def kvfuse_body(
        self, model: str, mode: str, recompute_ratio: float | None, max_tokens: int
    ) -> dict[str, Any]:
        """A streaming chat request for a kvfuse decode worker (separators and `segments`)."""
        body = _chat_body(model, self.system, self.user_text(DEFAULT_SEPARATOR), max_tokens)
        options: dict[str, Any] = {"segments": self.segments, "mode": mode}
        if recompute_ratio is not None:
            options["recompute_ratio"] = recompute_ratio
        body["kvfuse"] = options
        return body

    def plain_body(self, model: str, max_tokens: int) -> dict[str, Any]:
        """The same streaming chat request as plain text, for any OpenAI-compatible server."""
        return _chat_body(model, self.system, self.user_text(), max_tokens)


def _chat_body(model: str, system: str, user: str, max_tokens: int) -> dict[str, Any]:
    """Greedy, streamed, usage in the last chunk."""
    return {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def load_pool(path: str | Path) -> tuple[list[Passage], list[str]]:
    """Reads `musique_s.json`: every passage of every entry, deduplicated, and the questions.

    Args:
        path: JSON list of objects with `ctxs` ([{title, text}]) and `question`.

    Returns:
        (passages in order of first appearance, deduplicated by (title, text); questions with
        the short-answer instruction appended, in file order).

    Raises:
        ConfigError: The file is missing, not JSON, or holds no passages or questions.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the Musique file ({err})") from err
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a JSON list of questions")
    seen: dict[tuple[str, str], Passage] = {}
    questions = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: every entry must be an object")
        for ctx in entry.get("ctxs") or ():
            if isinstance(ctx, dict) and isinstance(ctx.get("text"), str) and ctx["text"].strip():
                title, text = str(ctx.get("title") or "").strip(), ctx["text"].strip()
                seen.setdefault((title, text), Passage(title, text))
        question = entry.get("question")
        if isinstance(question, str) and question.strip():
            questions.append(f"{question.strip()} {MUSIQUE_INSTRUCTION}")
    if not seen or not questions:
        raise ConfigError(f"{path}: no passages or no questions")
    return list(seen.values()), questions


def zipf_weights(num_items: int, s: float) -> list[float]:
    """Normalised Zipf weights: item of rank k (1-based) gets k^-s / sum_j j^-s."""
    if num_items < 1 or s < 0:
        raise ConfigError("zipf: need num_items >= 1 and s >= 0")
    raw = [rank ** (-s) for rank in range(1, num_items + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def popularity_order(num_passages: int, seed: int = 0) -> list[int]:
    """Passage indices from most to least popular: the ranks `make_workload` draws by."""
    by_rank = list(range(num_passages))
    random.Random(f"kvfuse-serve-popularity-{seed}").shuffle(by_rank)
    return by_rank


def make_workload(
    passages: Sequence[Passage],
    questions: Sequence[str],
    num_requests: int,
    num_docs: int = DEFAULT_NUM_DOCS,
    zipf_s: float = DEFAULT_ZIPF_S,
    seed: int = 0,
    system: str = RAG_SYSTEM,
) -> list[RagRequest]:
    """Draws `num_requests` requests; the same arguments always give the same list.

    Popularity ranks are a seeded random permutation of the pool (file order carries no
    popularity). Each request draws `num_docs` distinct passages by Zipf weight (rejecting
    repeats), shuffles them, and takes a uniformly drawn question. Request `i` does not depend
    on `num_requests`, so a shorter workload is a prefix of a longer one.

    Raises:
        ConfigError: `num_docs` exceeds the pool, or a count is negative.
    """
    if num_requests < 0 or not 1 <= num_docs <= len(passages) or not questions:
        raise ConfigError(f"need 1 <= num_docs <= {len(passages)} and num_requests >= 0")
    by_rank = popularity_order(len(passages), seed)
    cumulative = list(accumulate(zipf_weights(len(passages), zipf_s)))
    requests = []
    for index in range(num_requests):
        draw = random.Random(f"kvfuse-serve-request-{seed}-{index}")
        chosen: list[int] = []
        while len(chosen) < num_docs:
            rank = min(bisect_right(cumulative, draw.random() * cumulative[-1]), len(passages) - 1)
            if by_rank[rank] not in chosen:
                chosen.append(by_rank[rank])
        draw.shuffle(chosen)
        requests.append(
            RagRequest(
                index=index,
                system=system,
                passage_ids=tuple(chosen),
                documents=tuple(passages[i].document for i in chosen),
                question=questions[draw.randrange(len(questions))],
            )
        )
    return requests


def reuse_fraction(requests: Sequence[RagRequest], seen_before: Sequence[RagRequest] = ()) -> float:
    """Fraction of the passages in `requests` already seen earlier (in `seen_before` or in an
    earlier request of `requests`): an upper bound of a chunk cache's hit rate."""
    seen = {p for r in seen_before for p in r.passage_ids}
    hits = total = 0
    for request in requests:
        for passage in request.passage_ids:
            hits += passage in seen
            total += 1
            seen.add(passage)
    return hits / total if total else 0.0
