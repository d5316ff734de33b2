"""Shared codec helpers: input checks, byte conversion, directed fp16 rounding."""

from __future__ import annotations

import pytest
import torch

from kvfuse.codecs.tensors import (
    check_fp16_range,
    check_kv,
    fp16_ceil,
    fp16_floor,
    from_array,
    numpy_dtype,
    to_bytes,
)
from kvfuse.errors import CodecError


def test_directed_fp16_rounding_brackets_the_input() -> None:
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 100
    x = torch.cat([x, torch.tensor([0.0, 1.0, -1.0, 1e-9, 65504.0, -65504.0])])
    lo, hi = fp16_floor(x), fp16_ceil(x)
    assert lo.dtype == hi.dtype == torch.float16
    assert bool((lo.float() <= x).all())
    assert bool((hi.float() >= x).all() and (hi > 0).all())
    # Tight: the next fp16 value towards x would cross it.
    up = torch.nextafter(lo, torch.full_like(lo, float("inf")))
    assert bool((up.float() > x).all())


def test_fp16_overflow_is_detected() -> None:
    params = fp16_ceil(torch.tensor([1e5]))
    with pytest.raises(CodecError, match="too large"):
        check_fp16_range(params)
    with pytest.raises(CodecError):
        check_fp16_range(fp16_floor(torch.tensor([-7e4])))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_round_trip(dtype: torch.dtype) -> None:
    import numpy as np

    t = torch.randn(3, 2, 5).to(dtype)
    data = to_bytes(t)
    assert len(data) == t.numel() * t.element_size()
    back = from_array(np.frombuffer(data, numpy_dtype(dtype)).copy(), dtype, (3, 2, 5))
    assert torch.equal(back, t)


def test_check_kv_returns_contiguous_cpu_tensors() -> None:
    k = torch.randn(4, 2, 8)[:, :, ::2]
    k2, _v2 = check_kv(k, k, 0, 1)
    assert k2.is_contiguous() and torch.equal(k2, k)
    with pytest.raises(CodecError, match=r"\[T, H_kv, D\]"):
        check_kv(k, k[:2], 0, 1)
    with pytest.raises(CodecError, match="dtype"):
        check_kv(k.double(), k.double(), 0, 1)
    with pytest.raises(CodecError, match="tensors"):
        check_kv(k.numpy(), k, 0, 1)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="D=2000"):
        check_kv(torch.zeros(1, 1, 2000), torch.zeros(1, 1, 2000), 0, 1)
