"""PagedKV on vLLM's real CPU KV layouts (fp32 and bf16, the ISA vLLM picks on this CPU): rows
from outside land exactly where vLLM's own cache write puts them, and read back unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kvfuse.connector.paged import PagedKV, slot_mapping

H, BS, D = 3, 128, 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_match_vllms_cache_write(dtype: torch.dtype) -> None:
    isa = _get_attn_isa(dtype, BS, D, "auto")

    def vllm_write(
        k: Tensor, v: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor
    ) -> None:
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)

    caches = [torch.zeros(6, H, BS, 2 * D, dtype=dtype)]
    paged = PagedKV.probe(caches, vllm_write)
    n, block_ids = 300, [2, 0, 5]
    k = torch.randn(n, H, D).to(dtype)  # KV from outside vLLM, [n, H_kv, D]
    v = torch.randn(n, H, D).to(dtype)
    slots = slot_mapping(block_ids, BS, 0, n)
    paged.write(0, k.transpose(0, 1), v.transpose(0, 1), paged.slot_offsets(slots))
    expected = torch.zeros_like(caches[0])
    halves = expected.view(6, H, 2 * BS, D)
    vllm_write(k, v, halves[:, :, :BS], halves[:, :, BS:], slots)
    assert torch.equal(caches[0], expected), isa
    rows_k, rows_v = paged.unpack(paged.copy_blocks(block_ids)[0])  # [3, BS, H, D]
    assert torch.equal(rows_k.reshape(-1, H, D)[:n], k)
    assert torch.equal(rows_v.reshape(-1, H, D)[:n], v)
