"""One decode step for a batch of sequences, each with its own KV cache and position.

The new tokens of B sequences share every row-wise op as one [B, hidden] batch (embedding,
norms, Q/K/V projections, RoPE with per-row positions, output projection, MLP, LM head);
attention alone runs per sequence over its own cache (`KERNELS.decode_attention`), so sequences
of any lengths mix without padding. `decode_step` is `decode_batch` with B = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kvfuse.decode.cache import KVCache
from kvfuse.errors import InvalidRequestError
from kvfuse.model.fused import KERNELS
from kvfuse.model.transformer import Transformer


@torch.inference_mode()
def decode_batch(model: Transformer, caches: Sequence[KVCache], token_ids: Sequence[int]) -> Tensor:
    """Appends `token_ids[b]` to `caches[b]` at position `caches[b].num_tokens`, for every b.

    Side effects: writes one K/V row per layer into each cache and advances its `num_tokens`.
    Not thread-safe with respect to the caches (the model is only read).

    Shape: B caches, B token ids -> next-token logits [B, vocab] fp32.

    Raises:
        InvalidRequestError: empty batch, mismatched lengths, a cache listed twice or full.
    """
    _check_batch(caches, token_ids)
    device = model.device
    positions = [cache.num_tokens for cache in caches]
    cos, sin = model.cos_sin(torch.tensor(positions, device=device))  # [B, D] fp32
    cos, sin = cos.to(model.dtype), sin.to(model.dtype)  # once, not in every layer's RoPE
    h = model.embed(torch.tensor(list(token_ids), device=device))  # [B, hidden]
    for layer_idx, block in enumerate(model.blocks):
        q, k, v = block.qkv(h, cos, sin)  # [H, B, D], [H_kv, B, D] ×2
        k_caches = [cache.k[layer_idx] for cache in caches]
        v_caches = [cache.v[layer_idx] for cache in caches]
        attn = KERNELS.decode_attention(q, k, v, k_caches, v_caches, positions)  # [H, B, D]
        h = block.finish(h, block.self_attn.project(attn))  # [B, hidden]
    for cache, pos in zip(caches, positions, strict=True):
        cache.num_tokens = pos + 1
    return model.logits(h)  # [B, vocab]


def _check_batch(caches: Sequence[KVCache], token_ids: Sequence[int]) -> None:
    if not caches:
        raise InvalidRequestError("decode batch is empty")
    if len(caches) != len(token_ids):
        raise InvalidRequestError(
            f"decode batch has {len(caches)} caches but {len(token_ids)} tokens"
        )
    if len({id(cache) for cache in caches}) != len(caches):
        raise InvalidRequestError("a KV cache appears twice in one decode batch")
    for cache in caches:
        if cache.num_tokens >= cache.capacity:
            raise InvalidRequestError(f"KV cache is full ({cache.capacity} tokens)")
