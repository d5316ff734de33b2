"""A sequence's preallocated per-layer KV cache, filled from a prefill's fused layers."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvfuse.blend.run import FusedLayer
from kvfuse.model.transformer import Transformer
from kvfuse.prefill.pipeline import Prefilled


class KVCache:
    """Per-layer K/V buffers of one sequence. Shape: k[l], v[l] [H_kv, capacity, D].

    Filled once from a prompt's fused layers, then one token per `decode_step`.
    """

    def __init__(self, model: Transformer, capacity: int) -> None:
        cfg = model.cfg
        shape = (cfg.num_kv_heads, capacity, cfg.head_dim)
        dtype, device = model.dtype, model.device
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self.num_tokens = 0

    def fill_from(self, items: Iterable[FusedLayer | Prefilled]) -> Prefilled:
        """Copies a prefill run's fused layers in as they come and runs it to its end (where
        it stores what it missed); returns its `Prefilled`."""
        prefilled = None
        for item in items:
            if isinstance(item, Prefilled):
                prefilled = item
            else:
                self.fill([item])
        if prefilled is None:
            raise RuntimeError("the prefill run ended without its result")
        return prefilled

    def fill(self, layers: Iterable[FusedLayer]) -> None:
        """Copies a prompt's fused layers in; sets `num_tokens` to the prompt length."""
        for layer in layers:
            length = layer.k.shape[1]
            self.k[layer.layer_idx][:, :length] = layer.k
            self.v[layer.layer_idx][:, :length] = layer.v
            self.num_tokens = length
