"""`raw` is bit-exact in every dtype; `fp16` errs by exactly fp16 rounding and refuses overflow."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from kvfuse.codecs import get_codec
from kvfuse.codecs.header import HEADER_SIZE
from kvfuse.errors import CodecError

if TYPE_CHECKING:  # conftest is pytest's to import; only its type is needed here
    from tests.kvfuse.codecs.conftest import KVFactory

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_is_bit_exact(
    dtype: torch.dtype, make_random: KVFactory, make_structured: KVFactory
) -> None:
    raw = get_codec("raw")
    for k, v in (make_random(dtype=dtype), make_structured(dtype=dtype)):
        k[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
        payload = raw.encode(k, v, 0, 1)
        assert len(payload) == HEADER_SIZE + 2 * k.numel() * k.element_size()
        k2, v2 = raw.decode(payload)
        assert torch.equal(k2.view(BITS[dtype]), k.view(BITS[dtype]))  # NaN and -0.0 included
        assert torch.equal(v2.view(BITS[dtype]), v.view(BITS[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp16_error_is_fp16_rounding(
    dtype: torch.dtype, make_random: KVFactory, make_structured: KVFactory
) -> None:
    fp16 = get_codec("fp16")
    for k, v in (make_random(dtype=dtype), make_structured(dtype=dtype)):
        payload = fp16.encode(k, v, 0, 1)
        assert len(payload) == HEADER_SIZE + 2 * k.numel() * 2
        k2, v2 = fp16.decode(payload)
        assert torch.equal(k2, k.half().to(dtype)) and torch.equal(v2, v.half().to(dtype))
        # Stated bound: half an fp16 ulp, relative 2**-11, for values in fp16's normal range.
        assert bool(((k2.float() - k.float()).abs() <= k.float().abs() * 2**-11 + 2**-25).all())


def test_fp16_is_exact_for_fp16_input(make_random: KVFactory) -> None:
    k, v = make_random(dtype=torch.float16)
    k2, v2 = get_codec("fp16").decode(get_codec("fp16").encode(k, v, 0, 1))
    assert torch.equal(k2, k) and torch.equal(v2, v)


def test_fp16_refuses_values_beyond_its_range(make_random: KVFactory) -> None:
    k, v = make_random()
    k[1, 1, 1] = 1e6
    with pytest.raises(CodecError, match="float16 range"):
        get_codec("fp16").encode(k, v, 0, 1)
    k[1, 1, 1] = float("inf")  # an inf that was already there is a value, not an overflow
    k2, _ = get_codec("fp16").decode(get_codec("fp16").encode(k, v, 0, 1))
    assert k2[1, 1, 1] == float("inf")
