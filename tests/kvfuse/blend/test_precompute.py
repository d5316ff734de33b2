"""Chunk precompute: several chunks in one pass give each chunk's own `precompute` (to the
matmuls' rounding, which depends on how many rows they take)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from kvfuse.blend.precompute import precompute, precompute_chunks
from kvfuse.kv import ChunkKV
from kvfuse.model.loader import LoadedModel, load_model
from kvfuse.model.transformer import Transformer


def _ids(seed: int, *lengths: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 5000, (n,), generator=gen).tolist() for n in lengths]


# Relative to each tensor's largest value: fp32 sums in another order; bf16 rounds a few ulps
# differently through 30 layers where a short chunk alone gets another matmul kernel.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2**-5}


def _assert_same(got: Sequence[ChunkKV], want: Sequence[ChunkKV]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.positions, b.positions)
        assert a.k.shape == b.k.shape and a.k.is_contiguous() and a.v.is_contiguous()
        for x, y in ((a.k, b.k), (a.v, b.v)):
            scale = float(y.float().abs().max())
            assert float((x.float() - y.float()).abs().max()) <= REL_TOL[y.dtype] * scale


def _one_by_one(
    model: Transformer, context: list[int], context_kv: ChunkKV | None, chunks: list[list[int]]
) -> list[ChunkKV]:
    return [precompute(model, context, context_kv, ids) for ids in chunks]


@pytest.fixture(scope="module")
def smollm_bf16(smollm_dir: Path, cache_dir: Path) -> LoadedModel:
    return load_model(smollm_dir, cache_dir, torch.bfloat16)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("with_context", [True, False])
def test_chunks_together_equal_each_alone(
    smollm: LoadedModel, smollm_bf16: LoadedModel, dtype: str, with_context: bool
) -> None:
    model = (smollm if dtype == "float32" else smollm_bf16).model
    context, *chunks = _ids(1, 24, 150, 7, 90, 131)
    context = context if with_context else []
    context_kv = precompute(model, [], None, context) if context else None
    want = _one_by_one(model, context, context_kv, chunks)
    _assert_same(precompute_chunks(model, context, context_kv, chunks), want)
    # passes split by rows (a chunk longer than the limit still gets a pass of its own)
    _assert_same(precompute_chunks(model, context, context_kv, chunks, max_rows=100), want)


def test_a_context_without_its_kv_is_computed_in_each_run(smollm: LoadedModel) -> None:
    """Under ChunkContext.BOS the context is computed inside each chunk's run, as alone."""
    model = smollm.model
    chunks = _ids(2, 40, 60)
    want = _one_by_one(model, [1], None, chunks)
    _assert_same(precompute_chunks(model, [1], None, chunks), want)


def test_stop_ends_the_pass_before_the_next_layer(smollm: LoadedModel) -> None:
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 3  # the first pass's check, then layers 0 and 1 run

    assert precompute_chunks(smollm.model, [], None, _ids(3, 20, 30), stop=stop) == []
    assert len(asked) == 4
