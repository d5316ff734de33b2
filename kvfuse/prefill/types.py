"""The prefill contract between a decode worker and whoever computes its prompt KV, and the
records that cross it.

A decode worker sends a `PrefillRequest` (token segments, mode, ratio, sampling params for the
first token) to a `Prefiller` — the prefill worker over gRPC, or the engine in-process — and
receives the fused KV layer by layer (`FusedLayer`, layer 0 first), then one `PrefillResult`
with the first sampled token and the stats. Layers are streamed so decode can copy layer l
while layer l+1 is still being computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from kvfuse.blend.config import Mode
from kvfuse.blend.plan import PlannedPrefill
from kvfuse.blend.run import BlendStats, FusedLayer
from kvfuse.errors import InvalidRequestError
from kvfuse.model.sampling import SamplingParams
from kvfuse.segments import PromptSegments

MAX_REQUEST_ID_CHARS = 256  # longer ids are refused: they end up in logs and metrics exemplars


def check_request_id(request_id: str) -> None:
    """Raises InvalidRequestError for a request id longer than the protocol allows."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(f"request_id longer than {MAX_REQUEST_ID_CHARS} characters")


class MissPolicy(str, Enum):
    """What a request does with a prefix or chunk the cache does not hold.

    - `forced`: its rows are computed in place with full attention (forced rows of the blend);
      the write-behind then precomputes the chunk again, standalone, to store it.
    - `precompute`: the request first precomputes the chunk standalone after its chunk
      context — exactly the object the write-behind would store — and uses it like a hit (it
      goes through selective recompute); the write-behind only stores it. Each miss is
      computed once, and a cold request answers like the warm one that follows it.
    """

    FORCED = "forced"
    PRECOMPUTE = "precompute"


# Modes whose misses `precompute` precomputes: prefix_cache reads only the prefix and the
# first chunk, and computes a missing first chunk exactly in place anyway.
PRECOMPUTE_MODES = frozenset({Mode.BLEND, Mode.FULL_REUSE})


class ChunkInfo(Protocol):
    """A stored object's layout as a lookup reports it (the SDK's `Entry`, an in-process
    `ChunkKV`): each layer's K/V is [num_tokens, H_kv, D] at positions position_offset ..
    position_offset + num_tokens - 1."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def position_offset(self) -> int: ...


@dataclass(frozen=True)
class PrefillRequest:
    """One prompt to prefill.

    Attributes:
        request_id: the caller's id (X-Request-Id), for logs and tracing.
        segments: token ids of prefix | chunks | query, each tokenized on its own.
        mode: blend, full_prefill, full_reuse or prefix_cache.
        recompute_ratio: None uses the prefiller's default (controller policy).
        sampling: used for the first token only (its seed makes it repeatable).
        handoff_id: set: a remote prefill keeps the fused layers under this id for a decode
            engine's KV connector to take (`kvfuse.prefill.handoff`) instead of sending them.
    """

    request_id: str
    segments: PromptSegments
    mode: Mode = Mode.BLEND
    recompute_ratio: float | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    handoff_id: str = ""


@dataclass(frozen=True)
class PrefillStats:
    """What a prefill reused and computed, and why it fell back if it did.

    Token counts partition the prompt (forced chunk starts aside): cached + precomputed +
    computed = prompt tokens; recomputed rows are cached or precomputed rows that the blend
    computed again. Tokens this request computed: precomputed + computed + recomputed.

    Attributes:
        num_cached_tokens: rows whose KV came from the cache (hits, a reused prefix).
        num_recomputed_tokens: reused rows selected for recompute.
        num_computed_tokens: rows computed in place (query, forced misses, last token).
        num_chunk_hits: chunks found in the cache; a precomputed miss is not a hit.
        prefill_s: from when the prefiller took the request (waiting for its compute lock
            included) to the first token.
        fallback: "" normally; otherwise why chunks were computed instead of fetched
            (e.g. "cache_unavailable", "cache_timeout"). The request still succeeds.
        num_precomputed_tokens: rows of missing objects (prefix included) this request
            precomputed standalone and reused (`MissPolicy.PRECOMPUTE`).
        num_chunks_precomputed: missing chunks precomputed that way.
        num_memory_hits: chunk hits read from memory (a cache server's memory tier or an
            in-process store) rather than a slower tier.
        recompute_ratio: the ratio a blend used (0 for the other modes).
        ratio_source: where it came from: "request", "controller" or "default" ("" for the
            other modes).
    """

    num_prompt_tokens: int
    num_cached_tokens: int
    num_recomputed_tokens: int
    num_computed_tokens: int
    num_chunks: int
    num_chunk_hits: int
    prefill_s: float
    fallback: str = ""
    num_precomputed_tokens: int = 0
    num_chunks_precomputed: int = 0
    num_memory_hits: int = 0
    recompute_ratio: float = 0.0
    ratio_source: str = ""

    @classmethod
    def of_run(
        cls, stats: BlendStats, planned: PlannedPrefill, start_s: float, fallback: str = ""
    ) -> PrefillStats:
        """A finished run's counters as the contract reports them; `prefill_s` ends now.

        The run counts precomputed rows as cached; here they are reported on their own, so
        cached + precomputed + computed = prompt tokens (without forced chunk starts).
        """
        return cls(
            num_prompt_tokens=stats.num_tokens,
            num_cached_tokens=stats.num_cached_tokens - planned.num_precomputed_tokens,
            num_recomputed_tokens=stats.num_recomputed_tokens,
            num_computed_tokens=stats.num_computed_tokens,
            num_chunks=planned.num_chunks,
            num_chunk_hits=planned.num_chunk_hits,
            prefill_s=time.perf_counter() - start_s,
            fallback=fallback,
            num_precomputed_tokens=planned.num_precomputed_tokens,
            num_chunks_precomputed=planned.num_chunks_precomputed,
        )


@dataclass(frozen=True)
class PrefillResult:
    """The last message of a prefill stream."""

    first_token_id: int
    stats: PrefillStats


class Cancel:
    """A request's cancel flag, set from any thread (a client went away, a deadline passed).

    Callbacks registered with `on_cancel` run once, on the cancelling thread (at once if the
    flag is already set): they wake whatever the request is blocked on. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.event = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def cancel(self) -> None:
        with self._lock:
            if self.event.is_set():
                return
            self.event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class Prefiller(Protocol):
    """Computes a prompt's fused KV. Implementations are thread-safe.

    `prefill` returns an iterator that yields every layer's `FusedLayer` (shape k, v
    [H_kv, N, D]) in layer order, then exactly one `PrefillResult`. Setting `cancel` (any
    thread) stops the work between layers and between the missing objects it computes; the
    iterator then ends early or raises ServiceUnavailableError. Abandoning the iterator early
    (closing it) also releases the work. Errors raise kvfuse.errors types
    (InvalidRequestError, PromptTooLongError, ServiceUnavailableError).
    """

    def prefill(
        self, request: PrefillRequest, cancel: Cancel | None = None
    ) -> Iterator[FusedLayer | PrefillResult]: ...


@dataclass(frozen=True)
class WarmResult:
    """What storing a set of chunks ahead of the requests that will read them did.

    Objects are the prompt's prefix (when it has one) and its chunks, each counted once:
    num_objects = num_present + num_stored + num_failed.

    Attributes:
        num_present: already stored; nothing computed.
        num_stored: computed (after the chunk context) and stored now.
        num_failed: computed but not stored (the cache refused or was unreachable); warming
            again retries exactly these.
        num_computed_tokens: tokens of the objects computed.
        warm_s: wall time of the whole call.
    """

    num_objects: int
    num_present: int
    num_stored: int
    num_failed: int
    num_computed_tokens: int
    warm_s: float


class ChunkWarmer(Protocol):
    """Precomputes and stores a prompt's chunks so the requests that later carry them hit.

    The prompt's query segment is ignored (it is never stored). Only missing objects are
    computed: warming twice costs one lookup the second time. Thread-safe; requests keep
    running meanwhile (the model is taken one object at a time). Errors raise kvfuse.errors
    types (InvalidRequestError for an empty chunk or one longer than the context,
    ServiceUnavailableError when the warmer cannot be reached).
    """

    def warm_chunks(self, segments: PromptSegments, request_id: str = "") -> WarmResult: ...
