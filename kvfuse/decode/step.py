"""Incremental decoding of one sequence over its KV cache: a step, teacher-forced scoring,
generation until a stop token."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kvfuse.decode.batch import decode_batch
from kvfuse.decode.cache import KVCache
from kvfuse.model.sampling import Sampler
from kvfuse.model.transformer import Transformer

__all__ = ["KVCache", "decode_step", "generate_tokens", "score_continuation"]


def decode_step(model: Transformer, cache: KVCache, token_id: int) -> Tensor:
    """Appends one token at position `cache.num_tokens`; returns next-token logits [vocab].

    Raises:
        InvalidRequestError: the cache is full.
    """
    return decode_batch(model, [cache], [token_id])[0]


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
