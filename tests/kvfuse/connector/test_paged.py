"""PagedKV over a packed block layout learned from a cache-write function: rows written by slot
land where that function puts them, and copied blocks unpack to the rows written."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kvfuse.connector.paged import PagedKV, probe_offsets, slot_mapping

H, BS, D = 3, 8, 4


def column_major_write(k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, slots: Tensor) -> None:
    """A layout like vLLM's `vec` ISA: K column-major per (block, head), V row-major."""
    _, num_heads, block_size, head_dim = kc.shape
    for i, slot in enumerate(slots.tolist()):
        block, row = divmod(slot, block_size)
        for head in range(num_heads):
            columns = torch.arange(head_dim) * block_size + row  # memory [D, block_size]
            kc[block, head].view(-1)[columns] = k[i, head]
            vc[block, head, row] = v[i, head]


def test_slot_mapping() -> None:
    assert slot_mapping([5, 2], 4, 2, 7).tolist() == [22, 23, 8, 9, 10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_land_where_the_write_function_puts_them(dtype: torch.dtype) -> None:
    caches = [torch.zeros(5, H, BS, 2 * D, dtype=dtype) for _ in range(2)]
    paged = PagedKV.probe(caches, column_major_write)
    assert (paged.block_size, paged.num_kv_heads, paged.head_dim) == (BS, H, D)
    n = 13
    k = torch.randn(H, n, D).to(dtype)  # [H_kv, n, D]
    v = torch.randn(H, n, D).to(dtype)
    slots = slot_mapping([3, 1], BS, 2, 2 + n)  # starting mid-block
    paged.write(1, k, v, paged.slot_offsets(slots))
    expected = torch.zeros_like(caches[1])
    key_cache, value_cache = (expected.view(5, H, 2 * BS, D)[:, :, s] for s in
                              (slice(0, BS), slice(BS, None)))  # fmt: skip
    column_major_write(k.transpose(0, 1), v.transpose(0, 1), key_cache, value_cache, slots)
    assert torch.equal(caches[1], expected) and not caches[0].any()
    unpacked_k, unpacked_v = paged.unpack(paged.copy_blocks([3, 1])[1])  # [2, BS, H, D]
    rows_k = unpacked_k.reshape(2 * BS, H, D)[2 : 2 + n].transpose(0, 1)
    rows_v = unpacked_v.reshape(2 * BS, H, D)[2 : 2 + n].transpose(0, 1)
    assert torch.equal(rows_k, k) and torch.equal(rows_v, v)


def test_a_write_that_is_no_permutation_is_refused() -> None:
    def lossy(k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, slots: Tensor) -> None:
        kc[:, :, :, :] = 0  # drops everything

    with pytest.raises(RuntimeError, match="not a permutation"):
        probe_offsets((H, BS, D), torch.float32, lossy)


def test_rows_of_another_dtype_are_refused() -> None:
    paged = PagedKV.probe([torch.zeros(2, H, BS, 2 * D)], column_major_write)
    k = torch.zeros(H, 1, D, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        paged.write(0, k, k, paged.slot_offsets(torch.tensor([0])))
