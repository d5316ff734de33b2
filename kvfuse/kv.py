"""KV layouts: stored chunk objects ([L, T, H_kv, D] + positions) and assembly into a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kvfuse import rope


@dataclass(frozen=True)
class ChunkKV:
    """The KV of one segment computed alone after its chunk context.

    Attributes:
        k: post-RoPE keys at `positions`. Shape: [L, T, H_kv, D].
        v: values. Shape: [L, T, H_kv, D].
        positions: the positions the keys were rotated to. Shape: [T] int64.
    """

    k: Tensor
    v: Tensor
    positions: Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.k.shape[0])

    @property
    def num_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2 + self.positions.numel() * 8

    def layer(self, idx: int) -> tuple[Tensor, Tensor]:
        """K and V of one layer. Shape: ([T, H_kv, D], [T, H_kv, D])."""
        return self.k[idx], self.v[idx]


class ChunkLayers(Protocol):
    """A chunk's cached KV readable one layer at a time; layers may still be arriving.

    `ChunkKV` is one; a worker's streamed chunk is another (its `layer` blocks until the layer
    has arrived).
    """

    @property
    def positions(self) -> Tensor:
        """Positions its keys were rotated to. Shape: [T] int64."""
        ...

    @property
    def num_tokens(self) -> int: ...

    def layer(self, idx: int) -> tuple[Tensor, Tensor]:
        """Shape: ([T, H_kv, D], [T, H_kv, D])."""
        ...


class PlacedKV:
    """Cached KV of several chunks placed at new offsets, assembled one layer at a time.

    Keys are moved from their stored positions to the new ones with a RoPE delta rotation;
    values need nothing. Layers are built on demand so a caller can start on layer 0 while
    later layers are still being fetched.
    """

    def __init__(
        self, chunks: Sequence[ChunkLayers], offsets: Sequence[int], inv_freq: Tensor
    ) -> None:
        self.chunks = list(chunks)
        new_positions = [
            torch.arange(o, o + c.num_tokens, device=c.positions.device)
            for c, o in zip(self.chunks, offsets, strict=True)
        ]
        self.delta = torch.cat(
            [n - c.positions for n, c in zip(new_positions, self.chunks, strict=True)]
        )
        self.is_identity = bool((self.delta == 0).all())
        self.inv_freq = inv_freq.to(self.delta.device)

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
        if not self.is_identity:
            k = rope.rotate_delta(k, self.delta, self.inv_freq)
        return k, v
