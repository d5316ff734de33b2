"""Prefill planning: which prompt rows are cached (and which of those exact) and which are forced,
from the objects a request found or precomputed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvfuse.blend.config import BlendConfig, Mode
from kvfuse.blend.place import PlacedKV
from kvfuse.kv import ChunkKV, ChunkLayers

if TYPE_CHECKING:  # keys imports the chunk context from this package
    from kvfuse.keys import PreparedPrompt


@dataclass(frozen=True)
class RowPlan:
    """Which prompt rows have cached KV and which must be computed. All masks: [N] bool.

    Attributes:
        token_ids: the prompt. Shape: [N] int64.
        cached: rows whose KV comes from the `LayerSource`, in row order.
        exact: cached rows whose KV is exact (a reused prefix): never recomputed.
        forced: rows always computed (query, cache misses, the last token).
        chunk_of: each row's chunk, in prompt order ([N] int64, -1 outside chunks); None:
            one chunk.
    """

    token_ids: Tensor
    cached: Tensor
    exact: Tensor
    forced: Tensor
    chunk_of: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def eligible(self) -> Tensor:
        """Cached rows that compete for recompute."""
        return self.cached & ~self.exact & ~self.forced


@dataclass(frozen=True)
class PlannedPrefill:
    """A prefill ready to run: the row plan, its cached KV and the check schedule.

    Attributes:
        num_chunk_hits: chunks whose KV came from the cache (precomputed misses excluded).
        num_chunks_precomputed: missing chunks this request precomputed and reuses.
        num_precomputed_tokens: rows (prefix included) whose reused KV this request
            precomputed; the plan counts them as cached rows.
    """

    plan: RowPlan
    cached_kv: PlacedKV | None
    schedule: dict[int, float]
    num_chunk_hits: int
    num_chunks: int
    num_chunks_precomputed: int = 0
    num_precomputed_tokens: int = 0


@dataclass(frozen=True)
class PlanInputs:
    """What planning needs besides the prompt.

    Attributes:
        lookup: cached objects by key (a store, or chunks still streaming in).
        precomputed: objects this request precomputed; they win over `lookup`.
        num_layers, inv_freq: the model's (check-layer schedule, RoPE correction).
        exact_first_chunk: the first chunk's KV, stored after this very prefix, is exact.
    """

    lookup: Callable[[str], ChunkLayers | None]
    precomputed: Mapping[str, ChunkKV]
    num_layers: int
    inv_freq: Tensor
    exact_first_chunk: bool


def plan_prefill(
    prompt: PreparedPrompt, mode: Mode, blend: BlendConfig, inputs: PlanInputs
) -> PlannedPrefill:
    """Decides which rows are cached (and which of them exact) and which are forced."""
    seg = prompt.segments
    rows = _Rows(seg.num_tokens)
    rows.forced[seg.num_tokens - len(seg.query_ids) :] = True
    rows.forced[-1] = True
    token_ids = torch.tensor(seg.token_ids)
    if mode is Mode.FULL_PREFILL:
        plan = RowPlan(token_ids, rows.cached, rows.exact, rows.forced)
        return PlannedPrefill(plan, None, {}, 0, len(seg.chunk_ids))

    def lookup(key: str) -> ChunkLayers | None:
        kv = inputs.precomputed.get(key)
        return kv if kv is not None else inputs.lookup(key)

    prefix_kv = lookup(prompt.prefix_key) if seg.prefix_ids else None
    if prefix_kv is not None:
        span = slice(0, len(seg.prefix_ids))
        rows.add(prefix_kv, span, True, prompt.prefix_key in inputs.precomputed)
    spans = zip(prompt.chunk_keys, seg.chunk_ids, seg.chunk_offsets, strict=True)
    for idx, (key, chunk_ids, offset) in enumerate(spans):
        first_exact = idx == 0 and prefix_kv is not None and inputs.exact_first_chunk
        if mode is Mode.PREFIX_CACHE and not first_exact:
            break
        if (kv := lookup(key)) is None:
            continue
        span = slice(offset, offset + len(chunk_ids))
        rows.chunk_of[span] = idx
        rows.add(kv, span, mode is Mode.PREFIX_CACHE, key in inputs.precomputed)
        if mode is Mode.BLEND:
            rows.forced[offset : offset + blend.num_forced_chunk_start] = True
        rows.num_chunks_precomputed += key in inputs.precomputed
        rows.num_hits += key not in inputs.precomputed
    rows.forced |= ~rows.cached  # cache misses are computed
    schedule = {Mode.BLEND: blend.schedule(inputs.num_layers), Mode.FULL_REUSE: {0: 0.0}}
    placed = PlacedKV(rows.pieces, rows.offsets, inputs.inv_freq) if rows.pieces else None
    return PlannedPrefill(
        RowPlan(token_ids, rows.cached, rows.exact, rows.forced, rows.chunk_of),
        placed,
        schedule.get(mode, {}),
        rows.num_hits,
        len(seg.chunk_ids),
        rows.num_chunks_precomputed,
        int(rows.precomputed.sum()),
    )


class _Rows:
    """The masks of a plan being built ([N] bool each) and the pieces placed so far."""

    def __init__(self, num_tokens: int) -> None:
        self.cached = torch.zeros(num_tokens, dtype=torch.bool)
        self.exact, self.forced = self.cached.clone(), self.cached.clone()
        self.precomputed = self.cached.clone()
        self.chunk_of = torch.full((num_tokens,), -1, dtype=torch.int64)
        self.pieces: list[ChunkLayers] = []
        self.offsets: list[int] = []
        self.num_hits = self.num_chunks_precomputed = 0

    def add(self, kv: ChunkLayers, span: slice, exact: bool, precomputed: bool) -> None:
        self.cached[span] = True
        self.exact[span] = exact
        self.precomputed[span] = precomputed
        self.pieces.append(kv)
        self.offsets.append(int(span.start))
