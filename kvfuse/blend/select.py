"""Row selection at a check layer: deviation of fresh from cached KV, the query's attention,
keeping the top rows overall or within each chunk's share."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvfuse.blend.config import Deviation


def select_rows(deviation: Tensor, candidate: Tensor, num_keep: int) -> Tensor:
    """Keeps every non-candidate row and the `num_keep` candidates deviating most.

    Ties break by lower index. Shape: deviation [S] fp32, candidate [S] bool -> sorted [S'].
    """
    score = torch.where(candidate, deviation, torch.full_like(deviation, -math.inf))
    order = torch.sort(score, descending=True, stable=True).indices
    keep = ~candidate
    keep[order[: min(num_keep, int(candidate.sum()))]] = True
    return keep.nonzero().squeeze(1)


def select_rows_per_chunk(
    score: Tensor, candidate: Tensor, chunk: Tensor, num_keep: Tensor
) -> Tensor:
    """Keeps every non-candidate row and, in each chunk c, the `num_keep[c]` candidates that
    score highest (ties by lower index). Shape: score [S] fp32, candidate [S] bool,
    chunk [S] int64 (candidates' in [0, C)), num_keep [C] int64 -> sorted [S']."""
    keep = ~candidate
    for idx, count in enumerate(num_keep.tolist()):
        if count > 0:
            members = (candidate & (chunk == idx)).nonzero().squeeze(1)
            top = torch.sort(score[members], descending=True, stable=True).indices[:count]
            keep[members[top]] = True
    return keep.nonzero().squeeze(1)


def split_budget(total: int, mass: Tensor, size: Tensor) -> Tensor:
    """Shares `total` rows among chunks in proportion to their (non-negative) `mass`, none
    beyond its `size`: what a full chunk cannot take goes to the others, the rounding's rows
    to the largest remainders; by size where no open chunk has mass. Sums to
    min(total, size.sum()). Shape: mass [C] fp32, size [C] int64 -> [C] int64."""
    budget = torch.zeros_like(size)
    is_open = size > 0
    left = min(total, int(size.sum()))
    while left > 0:
        weight = torch.where(is_open, mass.clamp(min=0), 0.0)
        if float(weight.sum()) <= 0.0:
            weight = torch.where(is_open, size.double(), 0.0)
        share = left * weight.double() / weight.sum()  # rows each open chunk would get
        full = is_open & (share >= size)
        if not full.any():
            whole = share.floor().long()
            rest = left - int(whole.sum())  # < the open chunks with a fractional share
            budget += whole
            budget[torch.sort(share - whole, descending=True, stable=True).indices[:rest]] += 1
            break
        budget[full], is_open = size[full], is_open & ~full
        left = min(total, int(size.sum())) - int(budget.sum())
    return budget


def num_covering(score: Tensor, candidate: Tensor, coverage: float, low: int, high: int) -> int:
    """The fewest top-scoring candidates whose (non-negative) scores reach `coverage` of all
    candidates' total, clamped to [low, high]; all of them (`high`) at coverage 1, whatever
    the rounding of the running sum. Shape: score [S] fp32, candidate [S] bool."""
    if coverage >= 1.0:
        return high
    ranked = torch.sort(score[candidate].clamp(min=0), descending=True).values
    total = float(ranked.sum())
    if total <= 0.0:
        return low
    reached = int((torch.cumsum(ranked, 0) < coverage * total).sum()) + 1
    return max(low, min(high, reached))


def deviation(
    kind: Deviation, fresh: tuple[Tensor, Tensor], cached: tuple[Tensor, Tensor]
) -> Tensor:
    """Per-row distance of fresh from cached KV over heads × head dim, fp32.

    Shape: fresh/cached ([H_kv, S, D], [H_kv, S, D]) -> [S].
    """
    index = 1 if kind is Deviation.V_L2 else 0
    diff = fresh[index].float() - cached[index].float()
    if kind is Deviation.K_L1:
        return diff.abs().sum(dim=(0, 2))
    return diff.pow(2).sum(dim=(0, 2))


def query_attention(q: Tensor, k: Tensor, q_positions: Tensor) -> Tensor:
    """Attention mass each key receives from the given query rows, summed over rows and heads.

    Shape: q [H, F, D], k [H_kv, N, D], q_positions [F] -> [N] fp32.
    """
    group = q.shape[0] // k.shape[0]
    keys = k.float().repeat_interleave(group, dim=0)  # [H, N, D]
    logits = q.float() @ keys.transpose(1, 2) / math.sqrt(q.shape[-1])  # [H, F, N]
    visible = torch.arange(k.shape[1], device=k.device)[None, :] <= q_positions[:, None]
    logits = logits.masked_fill(~visible, -math.inf)
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1))
