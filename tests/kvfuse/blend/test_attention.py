"""Row attention equals one masked attention call over all keys, for every layout it picks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from kvfuse.blend.attention import RowAttention
from kvfuse.model import fused
from kvfuse.model.config import ModelConfig, RopeConfig
from kvfuse.model.transformer import Attention

NUM_TOKENS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 700, 6, 2, 16


@pytest.fixture(scope="module")
def attn() -> Attention:
    cfg = ModelConfig(
        architecture="llama",
        vocab_size=32,
        hidden_size=NUM_HEADS * HEAD_DIM,
        intermediate_size=64,
        num_layers=1,
        num_heads=NUM_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1e4),
        max_position_embeddings=4096,
    )
    return Attention(cfg)


def reference(attn: Attention, q: Tensor, k: Tensor, v: Tensor, limit: Tensor) -> Tensor:
    """One call over all keys; row i sees keys ≤ limit[i]. Shape: -> [H, S, D]."""
    mask = torch.arange(k.shape[1])[None, :] <= limit[:, None]
    return attn.attention(q, k, v, mask, False)


def qkv(num_rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(num_rows)
    q = torch.randn(NUM_HEADS, num_rows, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=gen).to(dtype)
    return q, k, v


def scattered_rows(num_rows: int) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    chosen = torch.randperm(NUM_TOKENS - 10, generator=gen)[: num_rows - 10]
    return torch.cat([chosen.sort().values, torch.arange(NUM_TOKENS - 10, NUM_TOKENS)])


@pytest.mark.parametrize(
    ("rows", "layout"),
    [
        (torch.arange(NUM_TOKENS), "causal"),  # full prefill
        (torch.arange(40, NUM_TOKENS), "causal"),  # everything after an exact prefix
        (torch.arange(100, 400), "causal"),  # a run that ends before the last key
        (torch.arange(500, NUM_TOKENS), "groups"),  # a run after a long prefix
        (scattered_rows(90), "groups"),
        (scattered_rows(600), "groups"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_mask_matches_one_masked_call(
    attn: Attention, rows: Tensor, layout: str, dtype: torch.dtype
) -> None:
    q, k, v = qkv(rows.numel(), dtype)
    row_attention = RowAttention(rows, NUM_TOKENS, dtype)
    assert (row_attention.causal_pad >= 0) == (layout == "causal")
    out = row_attention(attn, q, k, v)
    expected = reference(attn, q, k, v, rows)
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=0)


def test_groups_each_see_the_keys_their_last_row_sees() -> None:
    rows = scattered_rows(600)
    row_attention = RowAttention(rows, NUM_TOKENS, torch.float32)
    assert len(row_attention.groups) > 1
    assert row_attention.groups[0].first == 0 and row_attention.groups[-1].last == rows.numel()
    for group in row_attention.groups:
        assert group.num_keys == int(rows[group.last - 1]) + 1
        visible = group.mask == 0
        assert torch.equal(visible.sum(dim=1), rows[group.first : group.last] + 1)
        assert bool((group.mask[~visible] == -math.inf).all())


def test_bottom_right_mask(attn: Attention) -> None:
    rows = scattered_rows(90)
    q, k, v = qkv(rows.numel(), torch.float32)
    out = RowAttention(rows, NUM_TOKENS, torch.float32, bottom_right=True)(attn, q, k, v)
    limit = NUM_TOKENS - rows.numel() + torch.arange(rows.numel())
    torch.testing.assert_close(out, reference(attn, q, k, v, limit), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernels", ["eager", "fused"])
def test_masks_are_built_only_for_the_sdpa_layouts(attn: Attention, kernels: str) -> None:
    rows = scattered_rows(90)
    q, k, v = qkv(rows.numel(), torch.float32)
    was_fused = fused.KERNELS.fused
    if kernels == "fused":
        if not fused.build_fused_kernels():
            pytest.skip("the fused kernels did not build here")
        fused.KERNELS.use_fused()
    else:
        fused.KERNELS.use_eager()
    try:
        row_attention = RowAttention(rows, NUM_TOKENS, torch.float32)
        assert "groups" not in vars(row_attention)  # building is cheap
        kernel_serves = fused.KERNELS.row_attention(q, k, v, rows) is not None
        out = row_attention(attn, q, k, v)
    finally:
        if was_fused:
            fused.KERNELS.use_fused()
        else:
            fused.KERNELS.use_eager()
    assert ("groups" in vars(row_attention)) == (not kernel_serves)
    torch.testing.assert_close(out, reference(attn, q, k, v, rows), atol=1e-5, rtol=0)
