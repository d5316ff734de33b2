"""Stored KV layout: a chunk object ([L, T, H_kv, D] + positions) and its layer-wise view."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from torch import Tensor


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
    def position_offset(self) -> int:
        """The first position (the chunk's positions are consecutive from there)."""
        return int(self.positions[0])

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


class LayerFrame(NamedTuple):
    """One decoded layer of one stored object (a `get_layers` item). Shape of k and v:
    [T, H_kv, D]."""

    key: str
    layer_idx: int
    k: Tensor
    v: Tensor
