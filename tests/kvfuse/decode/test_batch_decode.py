"""Batched decode equals one-at-a-time decode: same greedy tokens, logits to fp32 tolerance."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvfuse.decode.batch import decode_batch
from kvfuse.decode.step import KVCache, decode_step
from kvfuse.engine import Engine
from kvfuse.errors import InvalidRequestError
from kvfuse.model.loader import LoadedModel, load_model
from kvfuse.model.transformer import Transformer
from kvfuse.prefill import PrefillRequest, PrefillResult
from kvfuse.segments import build_prompt

# fp32 logits of a [B, hidden] matmul vs B [1, hidden] matmuls differ only in summation order.
ATOL = 1e-4
NUM_STEPS = 6


def _prefilled(model: Transformer, prompt_ids: list[int], capacity: int) -> tuple[KVCache, int]:
    """A cache holding `prompt_ids` (fed one by one) and the greedy next token."""
    cache = KVCache(model, capacity)
    logits = torch.empty(0)
    for token in prompt_ids:
        logits = decode_step(model, cache, token)
    return cache, int(torch.argmax(logits))


def _clone(cache: KVCache) -> KVCache:
    other = copy.copy(cache)
    other.k = [t.clone() for t in cache.k]
    other.v = [t.clone() for t in cache.v]
    return other


def _decode_both_ways(
    model: Transformer, caches: list[KVCache], first: list[int]
) -> tuple[list[list[int]], list[list[int]], float]:
    """Greedy-decodes NUM_STEPS tokens one at a time and batched; returns both and max |Δlogit|."""
    solo_caches, batch_caches = [_clone(c) for c in caches], [_clone(c) for c in caches]
    solo = [[t] for t in first]
    batch = [[t] for t in first]
    max_diff = 0.0
    for _ in range(NUM_STEPS):
        solo_logits = torch.stack(
            [decode_step(model, c, seq[-1]) for c, seq in zip(solo_caches, solo, strict=True)]
        )
        batch_logits = decode_batch(model, batch_caches, [seq[-1] for seq in batch])
        max_diff = max(max_diff, float((solo_logits - batch_logits).abs().max()))
        for seq, row in zip(solo, solo_logits, strict=True):
            seq.append(int(torch.argmax(row)))
        for seq, row in zip(batch, batch_logits, strict=True):
            seq.append(int(torch.argmax(row)))
    for solo_cache, batch_cache in zip(solo_caches, batch_caches, strict=True):
        assert solo_cache.num_tokens == batch_cache.num_tokens
        n = solo_cache.num_tokens
        for layer_k, other_k in zip(solo_cache.k, batch_cache.k, strict=True):
            torch.testing.assert_close(layer_k[:, :n], other_k[:, :n], atol=ATOL, rtol=0)
    return solo, batch, max_diff


def test_batched_equals_sequential_on_smollm(engine: Engine) -> None:
    """Three prompts of different lengths prefilled through the Prefiller contract."""
    prompts = [
        ["You answer briefly.", "The bridge was finished in 1931.", "When was it finished?"],
        ["Hi!"],
        ["Be terse.", "Edwin is a glassblower.", "Marla lives in Oslen.", "Who lives in Oslen?"],
    ]
    caches, first = [], []
    for idx, texts in enumerate(prompts):
        seg = build_prompt(engine.tokenizer, texts)
        stream = list(engine.prefill(PrefillRequest(f"r{idx}", seg)))
        result = stream[-1]
        assert isinstance(result, PrefillResult)
        cache = KVCache(engine.model, seg.num_tokens + NUM_STEPS + 1)
        cache.fill(layer for layer in stream[:-1] if not isinstance(layer, PrefillResult))
        caches.append(cache)
        first.append(result.first_token_id)
    assert len({c.num_tokens for c in caches}) == 3
    solo, batch, max_diff = _decode_both_ways(engine.model, caches, first)
    assert solo == batch
    assert max_diff < ATOL


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_batched_equals_sequential_on_tiny_models(
    arch: str, tiny_model_dir: Callable[[str], Path], cache_dir: Path
) -> None:
    model = load_model(tiny_model_dir(arch), cache_dir, torch.float32).model
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 11, 1, 7]
    caches, first = [], []
    for length in lengths:
        ids = torch.randint(0, model.cfg.vocab_size, (length,), generator=gen).tolist()
        cache, token = _prefilled(model, ids, length + NUM_STEPS + 1)
        caches.append(cache)
        first.append(token)
    solo, batch, max_diff = _decode_both_ways(model, caches, first)
    assert solo == batch
    assert max_diff < ATOL


def test_batch_of_one_is_decode_step(smollm: LoadedModel) -> None:
    model = smollm.model
    cache, token = _prefilled(model, [1, 504, 3250, 28], 8)
    other = _clone(cache)
    torch.testing.assert_close(
        decode_batch(model, [cache], [token])[0], decode_step(model, other, token), atol=0, rtol=0
    )


def test_bad_batches_are_refused(smollm: LoadedModel) -> None:
    model = smollm.model
    cache, token = _prefilled(model, [1, 504], 2)
    with pytest.raises(InvalidRequestError, match="full"):
        decode_batch(model, [cache], [token])
    fresh = KVCache(model, 4)
    with pytest.raises(InvalidRequestError, match="twice"):
        decode_batch(model, [fresh, fresh], [token, token])
    with pytest.raises(InvalidRequestError, match="2 tokens"):
        decode_batch(model, [fresh], [token, token])
    with pytest.raises(InvalidRequestError, match="empty"):
        decode_batch(model, [], [])
