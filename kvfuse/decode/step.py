"""Incremental decoding over a preallocated per-layer KV cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from kvfuse.blend.run import FusedLayer
from kvfuse.model.sampling import Sampler
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


@torch.inference_mode()
def decode_step(model: Transformer, cache: KVCache, token_id: int) -> Tensor:
    """Appends one token at position `cache.num_tokens`; returns next-token logits [vocab]."""
    pos = cache.num_tokens
    if pos >= cache.capacity:
        raise RuntimeError("KV cache is full")
    cos, sin = model.cos_sin(torch.tensor([pos], device=model.device))
    h = model.embed(torch.tensor([token_id], device=model.device))  # [1, hidden]
    for idx, block in enumerate(model.blocks):
        q, k, v = block.qkv(h, cos, sin)  # [H, 1, D], [H_kv, 1, D]
        cache.k[idx][:, pos : pos + 1] = k
        cache.v[idx][:, pos : pos + 1] = v
        keys, values = cache.k[idx][:, : pos + 1], cache.v[idx][:, : pos + 1]
        h = block.finish(h, block.attend(q, keys, values, None, is_causal=False))
    cache.num_tokens = pos + 1
    return model.logits(h)[0]


@torch.inference_mode()
def score_continuation(
    model: Transformer, cache: KVCache, last_logits: Tensor, continuation: list[int]
) -> Tensor:
    """Feeds `continuation` after a prefilled `cache` whose last prompt token gave
    `last_logits` (teacher forcing): row i is the next-token log-distribution after
    continuation[:i]. Shape: last_logits [vocab] -> [len(continuation), vocab] fp32."""
    logits = [last_logits] + [decode_step(model, cache, t) for t in continuation[:-1]]
    return torch.log_softmax(torch.stack(logits).float(), dim=-1)


def generate_tokens(
    model: Transformer,
    cache: KVCache,
    first_token: int,
    sampler: Sampler,
    stop_token_ids: set[int],
) -> Iterator[int]:
    """Yields `first_token`, then decodes until a stop token or `max_tokens` tokens.

    Stop tokens are not yielded.
    """
    token, budget = first_token, sampler.params.max_tokens
    for num_emitted in range(1, budget + 1):
        if token in stop_token_ids:
            return
        yield token
        if num_emitted == budget or cache.num_tokens >= cache.capacity:
            return
        token = sampler.sample(decode_step(model, cache, token))
