"""PlacedKV: chunks moved to new offsets, read whole (`layer`) or into prompt buffers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kvfuse.blend.place import PlacedKV
from kvfuse.kv import ChunkKV
from kvfuse.model import rope
from kvfuse.model.config import RopeConfig

NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 2, 3, 16
FREQS = rope.inv_freq(RopeConfig(theta=1e5), HEAD_DIM)


def chunk(num_tokens: int, first_position: int, seed: int, dtype: torch.dtype) -> ChunkKV:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_LAYERS, num_tokens, NUM_KV_HEADS, HEAD_DIM)
    k, v = torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)
    return ChunkKV(k, v, torch.arange(first_position, first_position + num_tokens))


def scattered(placed: PlacedKV, idx: int, rows: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """`layer` written into [H_kv, N, D] buffers at `rows` (what the blend used to do)."""
    k, v = placed.layer(idx)  # [N_cached, H_kv, D]
    k_all = torch.zeros(NUM_KV_HEADS, num_tokens, HEAD_DIM, dtype=k.dtype)
    v_all = torch.zeros_like(k_all)
    k_all[:, rows], v_all[:, rows] = k.transpose(0, 1), v.transpose(0, 1)
    return k_all, v_all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("moved", [True, False])
def test_layer_into_writes_layer_bit_for_bit_at_the_offsets(
    dtype: torch.dtype, moved: bool
) -> None:
    # A prefix that stays at 0, then two chunks stored at 5 and 12: left there, or moved on.
    prefix = chunk(5, 0, seed=0, dtype=dtype)
    chunks = [prefix, chunk(7, 5, seed=1, dtype=dtype), chunk(6, 12, seed=2, dtype=dtype)]
    offsets = [0, 5, 12] if not moved else [0, 9, 20]
    num_tokens = offsets[-1] + 6 + 3  # a gap row and a query after the last chunk
    placed = PlacedKV(chunks, offsets, FREQS)
    assert placed.is_identity is not moved
    rows = torch.cat(
        [torch.arange(o, o + c.num_tokens) for c, o in zip(chunks, offsets, strict=True)]
    )
    for idx in range(NUM_LAYERS):
        k_out = torch.zeros(NUM_KV_HEADS, num_tokens, HEAD_DIM, dtype=dtype)
        v_out = torch.zeros_like(k_out)
        placed.layer_into(idx, k_out, v_out)
        k_ref, v_ref = scattered(placed, idx, rows, num_tokens)
        assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_layer_rotates_each_chunk_by_its_delta() -> None:
    moved = chunk(7, 5, seed=3, dtype=torch.float32)
    placed = PlacedKV([moved], [40], FREQS)
    k, v = placed.layer(1)
    expected = rope.rotate_delta(moved.k[1], torch.full((7,), 35), FREQS)
    assert torch.equal(k, expected) and torch.equal(v, moved.v[1])
