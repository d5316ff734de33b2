"""The chunks `kvfuse bench cache` stores: real SmolLM2 chunk KV (default) or random fp16.

Real chunks are fact-QA documents precomputed after the system prompt by the fp32 model exactly
as the engine stores them (`benchmarks.codecs.chunk_kvs`), cut to the wanted token count and
cast to fp16: 30 layers x K,V x T x 3 x 64.
"""

from __future__ import annotations

import math

import torch

from benchmarks.cache_clients import Layers
from kvfuse.errors import KvfuseError
from kvfuse.kv import ChunkKV

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def _random_chunk(num_tokens: int, seed: int) -> Layers:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, NUM_KV_HEADS, HEAD_DIM)  # [T, H_kv, D]
    return [
        (torch.randn(shape, generator=gen).half(), torch.randn(shape, generator=gen).half())
        for _ in range(NUM_LAYERS)
    ]


def _model_kvs(num_chunks: int, num_tokens: int) -> list[ChunkKV]:
    """Real SmolLM2 chunk KV (fp32 model, stored as fp16), each cut to `num_tokens` tokens."""
    from benchmarks.codecs import chunk_kvs
    from kvfuse.engine import Engine

    engine = Engine.from_pretrained(dtype="float32")
    num_words = math.ceil(num_tokens * 330 / 490 * 1.2)  # ~490 tokens per 330 words, + margin
    kvs = []
    for kv in chunk_kvs(engine, num_chunks, num_words):
        if kv.num_tokens < num_tokens:
            raise KvfuseError(f"a real chunk has {kv.num_tokens} < {num_tokens} tokens")
        k, v = kv.k[:, :num_tokens].half(), kv.v[:, :num_tokens].half()  # [L, T, H_kv, D]
        kvs.append(ChunkKV(k.contiguous(), v.contiguous(), kv.positions[:num_tokens]))
    return kvs


def chunks(source: str, num_tokens: int, num_chunks: int) -> tuple[list[Layers], list[ChunkKV]]:
    """`num_chunks` fp16 chunks of `num_tokens` tokens from `source` ("model" or "random"): as
    (K, V) per layer for the clients, and as ChunkKVs for the codec table."""
    if source == "model":
        kvs = _model_kvs(num_chunks, num_tokens)
    else:
        kvs = []
        for seed in range(num_chunks):
            pairs = _random_chunk(num_tokens, seed)
            k, v = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
            kvs.append(ChunkKV(k, v, torch.arange(num_tokens)))  # [L, T, H_kv, D] each
    layers: list[Layers] = [[kv.layer(idx) for idx in range(kv.num_layers)] for kv in kvs]
    return layers, kvs
