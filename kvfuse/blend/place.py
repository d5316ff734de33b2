"""KV placement: cached chunks moved to their prompt offsets (RoPE delta on K), layer by layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvfuse.kv import ChunkLayers
from kvfuse.model import rope


class PlacedKV:
    """Cached KV of several chunks placed at new offsets, assembled one layer at a time.

    Keys are moved from their stored positions to the new ones with a RoPE delta rotation;
    values need nothing. Layers are built on demand so a caller can start on layer 0 while
    later layers are still being fetched. The rotation tables are built once, here.
    """

    def __init__(
        self, chunks: Sequence[ChunkLayers], offsets: Sequence[int], inv_freq: Tensor
    ) -> None:
        self.chunks = list(chunks)
        self.offsets = [int(o) for o in offsets]
        deltas = [
            torch.arange(o, o + c.num_tokens, device=c.positions.device) - c.positions
            for c, o in zip(self.chunks, self.offsets, strict=True)
        ]
        self.delta = torch.cat(deltas) if deltas else torch.zeros(0, dtype=torch.long)
        self.is_identity = bool((self.delta == 0).all())
        self.inv_freq = inv_freq.to(self.delta.device)
        # Per chunk: half-width cos/sin tables ([T | 1, 1, D/2] fp32), None when it stays put.
        self._tables = [
            None if self.is_identity else rope.delta_tables(d, self.inv_freq) for d in deltas
        ]

    @property
    def num_tokens(self) -> int:
        return int(self.delta.shape[0])

    def layer(self, idx: int) -> tuple[Tensor, Tensor]:
        """K rotated to the new positions and V, chunks concatenated in order.

        Shape: ([N_cached, H_kv, D], [N_cached, H_kv, D]).
        """
        layers = [c.layer(idx) for c in self.chunks]
        k = torch.cat([k for k, _ in layers])
        v = torch.cat([v for _, v in layers])
        start = 0
        for (k_chunk, _), table in zip(layers, self._tables, strict=True):
            end = start + k_chunk.shape[0]
            if table is not None:
                rope.rotate_into(k_chunk, *table, k[start:end])
            start = end
        return k, v

    def layer_into(self, idx: int, k_out: Tensor, v_out: Tensor) -> None:
        """Writes layer `idx` into the prompt-wide buffers at rows offset..offset+T-1 per chunk.

        Values are `layer`'s bit for bit, converted to the buffers' dtype; rows no chunk covers
        are left as they are. Shape: k_out, v_out [H_kv, N, D] with N ≥ every chunk's end.
        """
        for chunk, offset, table in zip(self.chunks, self.offsets, self._tables, strict=True):
            k, v = chunk.layer(idx)  # [T, H_kv, D]
            span = slice(offset, offset + k.shape[0])
            k_dst = k_out[:, span].transpose(0, 1)  # [T, H_kv, D] view
            if table is None:
                k_dst.copy_(k)
            else:
                rope.rotate_into(k, *table, k_dst)
            v_out[:, span].transpose(0, 1).copy_(v)
