"""CacheBlend: fuse cached chunk KV with a selective recompute, one layer at a time.

Every prompt mode runs through `BlendRun`; they differ only in the `RowPlan` (which rows have
cached KV, which of those are exact) and in the check schedule (which layers select rows):

- full prefill: nothing cached, no checks — a plain causal prefill;
- prefix caching: the leading exact rows cached, everything after them computed;
- full reuse: chunks cached, a check at layer 0 that keeps no eligible row;
- blend: chunks cached, checks at `check_layers` keeping the rows whose fresh KV deviates most
  from the cached KV, plus the forced rows (query, cache misses, last token).

Rows are computed in ascending original position and attend with an exact causal mask by
position; `MaskKind.BOTTOM_RIGHT` reproduces the public implementations' mask instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from kvfuse.blend.attention import RowAttention
from kvfuse.blend.config import ChunkBudget, Deviation, MaskKind, Selection
from kvfuse.blend.plan import RowPlan
from kvfuse.blend.select import (
    deviation,
    num_covering,
    query_attention,
    select_rows,
    select_rows_per_chunk,
    split_budget,
)
from kvfuse.errors import ConfigError
from kvfuse.model.transformer import Transformer


class LayerSource(Protocol):
    """Cached KV of the plan's cached rows, one layer per call, in layer order."""

    @property
    def num_tokens(self) -> int:
        """How many rows it covers: exactly the plan's cached rows."""
        ...

    def layer_into(self, idx: int, k_out: Tensor, v_out: Tensor) -> None:
        """Writes layer `idx`, keys at their new positions, into the plan's cached rows.

        Leaves every other row as it is. Shape: k_out, v_out [H_kv, N, D].
        """
        ...


class FusedLayer(NamedTuple):
    """One layer of the fused prompt KV. Shape: k, v [H_kv, N, D]."""

    layer_idx: int
    k: Tensor
    v: Tensor


@dataclass
class BlendStats:
    """What a run reused and computed; filled in while it runs."""

    num_tokens: int = 0
    num_cached_tokens: int = 0
    num_recomputed_tokens: int = 0
    num_computed_tokens: int = 0
    num_selected_per_check: list[int] = field(default_factory=list)
    num_layer_rows: int = 0  # rows computed, summed over layers (the compute it did)


class BlendRun:
    """One prompt's prefill; iterate it to get fused layers, then read `last_logits`.

    Lifecycle: construct, iterate to exhaustion (each `FusedLayer` is yielded as soon as it
    exists, so a caller can stream it while the next layer computes), then `last_logits` and
    `stats` are final. Not thread-safe; iterate once.
    """

    def __init__(
        self,
        model: Transformer,
        plan: RowPlan,
        cached_kv: LayerSource | None,
        schedule: dict[int, float],
        mask: MaskKind = MaskKind.EXACT,
        selection: Selection | None = None,
    ) -> None:
        num_cached = int(plan.cached.sum())
        if num_cached != (cached_kv.num_tokens if cached_kv is not None else 0):
            raise ConfigError(f"plan has {num_cached} cached rows, its KV source does not")
        self.model, self.plan = model, plan
        self.cached_kv = cached_kv if num_cached else None
        self.schedule, self.mask_kind = schedule, mask
        self.selection = selection or Selection()
        self.stats = BlendStats(num_tokens=plan.num_tokens, num_cached_tokens=num_cached)
        self._logits: Tensor | None = None

    @property
    def last_logits(self) -> Tensor:
        """Logits after the last prompt token, fp32. Shape: [vocab]."""
        if self._logits is None:
            raise RuntimeError("BlendRun must be iterated to the end first")
        return self._logits

    def __iter__(self) -> Iterator[FusedLayer]:
        model, plan = self.model, self.plan
        device, num_tokens = model.device, plan.num_tokens
        cos, sin = model.cos_sin(torch.arange(num_tokens, device=device))  # [N, D] fp32
        cos, sin = cos.to(model.dtype), sin.to(model.dtype)  # what the RoPE kernels cast them to
        rows = (~plan.exact).nonzero().squeeze(1).to(device)  # computed rows, ascending
        h = model.embed(plan.token_ids.to(device)[rows])  # [S, hidden]
        rows_cos, rows_sin, attend = cos[rows], sin[rows], self._row_attention(rows)
        for layer_idx, block in enumerate(model.blocks):
            attn, x = block.self_attn, block.input_layernorm(h)  # x [S, hidden]
            q: Tensor | None = None
            if self._selects_without_q(layer_idx):
                k, v = attn.kv(x, rows_cos, rows_sin)  # q only for the rows that go on
            else:
                q, k, v = attn.qkv(x, rows_cos, rows_sin)  # [H, S, D], [H_kv, S, D] ×2
            k_all, v_all, keep = self._fuse(layer_idx, rows, q, k, v)  # [H_kv, N, D] ×2
            if keep is not None:
                rows, h, x = rows[keep], h[keep], x[keep]
                q = q[:, keep] if q is not None else None
                rows_cos, rows_sin, attend = cos[rows], sin[rows], self._row_attention(rows)
            if q is None:
                q = attn.q(x, rows_cos, rows_sin)  # [H, S', D]
            h = block.finish(h, attn.project(attend(attn, q, k_all, v_all)))
            self.stats.num_layer_rows += int(rows.numel())
            yield FusedLayer(layer_idx, k_all, v_all)
        self._logits = model.logits(h[-1:])[0]
        num_recomputed = int(plan.eligible.to(device)[rows].sum())
        self.stats.num_recomputed_tokens = num_recomputed
        self.stats.num_computed_tokens = int(rows.numel()) - num_recomputed

    def _selects_without_q(self, layer_idx: int) -> bool:
        """A check layer whose metric needs no q: q is then computed for the kept rows only."""
        return (
            layer_idx in self.schedule
            and self.cached_kv is not None
            and not self.selection.needs_query
        )

    def _row_attention(self, rows: Tensor) -> RowAttention:
        bottom_right = self.mask_kind is MaskKind.BOTTOM_RIGHT
        return RowAttention(rows, self.plan.num_tokens, self.model.dtype, bottom_right)

    def _fuse(
        self, layer_idx: int, rows: Tensor, q: Tensor | None, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One layer's fused KV (cached rows, then the computed `rows` written over them).

        At a check layer also selects the rows that go on: indices into `rows`, else None.
        `q` is needed only for the metrics that read the query's attention.
        Shape: q [H, S, D], k/v [H_kv, S, D] -> [H_kv, N, D] ×2, [S'].
        """
        if self.cached_kv is None:
            return k, v, None  # nothing cached: the computed rows are the whole prompt
        shape = (k.shape[0], self.plan.num_tokens, k.shape[2])
        k_all = torch.empty(shape, dtype=k.dtype, device=k.device)
        v_all = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.cached_kv.layer_into(layer_idx, k_all, v_all)
        if layer_idx not in self.schedule:
            k_all.index_copy_(1, rows, k)
            v_all.index_copy_(1, rows, v)
            return k_all, v_all, None
        metric, value = self.selection.metric, None
        if metric is not Deviation.QUERY_ATTENTION:  # before the fresh rows overwrite them
            cached = (k_all.index_select(1, rows), v_all.index_select(1, rows))
            value = deviation(Deviation.V_L2 if metric.needs_query else metric, (k, v), cached)
        k_all.index_copy_(1, rows, k)
        v_all.index_copy_(1, rows, v)
        candidate = self.plan.eligible.to(rows.device)[rows]
        attention = None
        if self.selection.needs_query:
            if q is None:
                raise RuntimeError("selecting by the query's attention needs q at check layers")
            attention = query_attention(q[:, ~candidate], k_all, rows[~candidate])[rows]
        keep = self._select(layer_idx, rows, candidate, _Score.of(metric, value, attention))
        self.stats.num_selected_per_check.append(int(keep.numel()))
        return k_all, v_all, keep

    def _select(self, layer_idx: int, rows: Tensor, candidate: Tensor, score: _Score) -> Tensor:
        """The rows that go on past check layer `layer_idx`: indices into `rows`. Shape: [S']."""
        selection = self.selection
        num_eligible = int(self.plan.eligible.sum())
        num_keep = math.floor(self.schedule[layer_idx] * num_eligible)
        if selection.coverage is not None:
            low = min(num_keep, math.floor(selection.min_ratio * num_eligible))
            num_keep = num_covering(score.value, candidate, selection.coverage, low, num_keep)
        if selection.chunk_budget is ChunkBudget.GLOBAL or score.attention is None:
            return select_rows(score.value, candidate, num_keep)
        chunk_of = self.plan.chunk_of
        chunk = torch.zeros_like(rows) if chunk_of is None else chunk_of.to(rows.device)[rows]
        num_chunks = int(chunk.max()) + 1  # candidates' chunks are ≥ 0
        mass = torch.zeros(num_chunks, device=chunk.device)
        mass.index_add_(0, chunk[candidate], score.attention[candidate])
        size = torch.bincount(chunk[candidate], minlength=num_chunks)
        budget = split_budget(num_keep, mass, size)
        return select_rows_per_chunk(score.value, candidate, chunk, budget)


class _Score(NamedTuple):
    """A check layer's selection metric and, when read, the query's attention. Shape: [S] ×2."""

    value: Tensor
    attention: Tensor | None

    @classmethod
    def of(cls, metric: Deviation, distance: Tensor | None, attention: Tensor | None) -> _Score:
        """The metric from the V/K deviation (`distance`) and the query's attention."""
        if metric is Deviation.QUERY_WEIGHTED_V and distance is not None and attention is not None:
            return cls(attention * distance.sqrt(), attention)
        if distance is not None:
            return cls(distance, attention)
        if attention is not None:
            return cls(attention, attention)
        raise RuntimeError(f"no score for the {metric.value} metric")
