"""Attention of a prompt's computed rows over all of its fused keys, planned once per row set.

A blend computes only some rows (ascending positions) but they attend over every key. Under
the exact mask a row at position p sees keys ≤ p. Where the fused row attention kernel runs
(AVX2-only CPUs, fp32 or bf16) one call does it, each row over its own key prefix
(`KERNELS.row_attention`: flash-style, and a row gets the same bits whichever other rows are
computed with it). Elsewhere three layouts over sdpa implement it:

- causal: the rows are one run a..b-1 with a ≤ b − a (a layer computing every row after an
  exact prefix). The run is padded in front with `a` zero rows so the kernel's own (top-left)
  causal mask applies, which skips masked key blocks; the padding costs a²/2 scores, at most
  a quarter of the work, and its outputs are dropped.
- groups: anything else. Rows are attended in groups, each over the key prefix its last row
  sees, with an additive mask built here once (the kernel would rebuild a boolean one each
  call); more groups skip more masked keys, fewer are more efficient per score.
- bottom right: the public implementations' mask (row i of S sees keys ≤ N − S + i).
"""

from __future__ import annotations

import math
from functools import cached_property
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor

from kvfuse.model.fused import KERNELS
from kvfuse.model.transformer import Attention

# Rows per mask group by element size: smaller groups waste fewer masked scores but run the
# kernel less efficiently. Measured on CPU (447 rows of 2909): bf16 best at 128, fp32 at 64.
_ROWS_PER_GROUP = {2: 128, 4: 64}
_MAX_GROUPS = 8


class _Group(NamedTuple):
    """Rows first..last-1 of the computed rows; they see keys < num_keys, masked by `mask`."""

    first: int
    last: int
    num_keys: int
    mask: Tensor  # [S_g, num_keys] additive (0 or −inf), the attention dtype


class RowAttention:
    """Exact-causal (or bottom-right) attention of `rows` over the prompt's N keys.

    Build it when the computed rows change (a check layer), call it once per layer. Cheap to
    build: the sdpa masks are made on the first call that needs them. Not thread-safe.
    Shape: rows [S] int64, ascending and unique.
    """

    def __init__(
        self, rows: Tensor, num_tokens: int, dtype: torch.dtype, bottom_right: bool = False
    ) -> None:
        num_rows = int(rows.numel())
        self.rows, self.num_rows, self.num_tokens, self.dtype = rows, num_rows, num_tokens, dtype
        self.bottom_right = bottom_right
        first, last = int(rows[0]), int(rows[-1]) + 1
        # ≥ 0: the causal layout, with this many padding rows
        causal = not bottom_right and last - first == num_rows and first <= num_rows
        self.causal_pad = first if causal else -1
        self.last_key = rows  # [S]: the last key each row sees (the fused kernel's form)
        if bottom_right:  # row i of S sees keys ≤ N − S + i
            self.last_key = num_tokens - num_rows + torch.arange(num_rows, device=rows.device)

    @cached_property
    def groups(self) -> list[_Group]:
        """The masked sdpa groups, built on the first call the fused kernel does not serve."""
        key_pos = torch.arange(self.num_tokens, device=self.rows.device)
        if self.bottom_right:
            mask = _additive(key_pos, self.last_key, self.dtype)
            return [_Group(0, self.num_rows, self.num_tokens, mask)]
        rows_per_group = _ROWS_PER_GROUP.get(self.dtype.itemsize, 64)
        num_groups = min(_MAX_GROUPS, math.ceil(self.num_rows / rows_per_group))
        bounds = torch.linspace(0, self.num_rows, num_groups + 1).round().long().tolist()
        groups = []
        for lo, hi in pairwise(bounds):
            num_keys = int(self.rows[hi - 1]) + 1
            mask = _additive(key_pos[:num_keys], self.rows[lo:hi], self.dtype)  # [S_g, num_keys]
            groups.append(_Group(lo, hi, num_keys, mask))
        return groups

    def __call__(self, attn: Attention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention output of the rows, before the output projection.

        Shape: q [H, S, D], k/v [H_kv, N, D] (fused keys, all rows) -> [H, S, D].
        """
        out = KERNELS.row_attention(q, k, v, self.last_key)
        if out is not None:
            return out
        if self.causal_pad >= 0:
            pad = self.causal_pad
            end = pad + self.num_rows
            if pad:
                q = torch.cat([q.new_zeros(q.shape[0], pad, q.shape[2]), q], dim=1)  # [H, end, D]
            return attn.attention(q, k[:, :end], v[:, :end], None, True)[:, pad:]
        outs = [
            attn.attention(
                q[:, g.first : g.last], k[:, : g.num_keys], v[:, : g.num_keys], g.mask, False
            )
            for g in self.groups
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [H, S, D]


def _additive(key_pos: Tensor, limit: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where key position ≤ the row's limit, −inf elsewhere. Shape: [K], [S] -> [S, K]."""
    mask = torch.zeros(limit.shape[0], key_pos.shape[0], dtype=dtype, device=limit.device)
    return mask.masked_fill_(key_pos[None, :] > limit[:, None], -math.inf)
