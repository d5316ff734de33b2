"""`int8`: every element within scale/2 of the input, scale per (token, head), 8.25 bits/value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from kvfuse.codecs import get_codec
from kvfuse.codecs.header import HEADER_SIZE
from kvfuse.codecs.int8 import dequantize, quantize

if TYPE_CHECKING:  # conftest is pytest's to import; only its type is needed here
    from tests.kvfuse.codecs.conftest import KVFactory

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_within_half_scale(x: torch.Tensor, out: torch.Tensor) -> None:
    """|out - x| <= scale/2 (+ the output dtype's rounding of the dequantized value)."""
    _, scale = quantize(x)
    bound = scale.float()[..., None] / 2 + out.float().abs() * torch.finfo(x.dtype).eps / 2
    assert bool(((out.float() - x.float()).abs() <= bound * (1 + 1e-6) + 1e-30).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_is_at_most_half_a_scale(
    dtype: torch.dtype, make_random: KVFactory, make_structured: KVFactory
) -> None:
    codec = get_codec("int8")
    for k, v in (make_random(dtype=dtype), make_structured(dtype=dtype)):
        payload = codec.encode(k, v, 0, 1)
        t, h, d = k.shape
        assert len(payload) == HEADER_SIZE + 2 * (t * h * d + 2 * t * h)
        k2, v2 = codec.decode(payload)
        assert_within_half_scale(k, k2)
        assert_within_half_scale(v, v2)


def test_scale_is_tight_and_covers_the_max(make_random: KVFactory) -> None:
    k, _ = make_random()
    q, scale = quantize(k)
    amax = k.abs().amax(-1)
    assert scale.dtype == torch.float16 and scale.shape == amax.shape
    assert bool((scale.float() * 127 >= amax).all())  # rounded up: no clipping
    assert bool((scale.float() * 127 <= amax * (1 + 2**-10) + 2**-24 * 127).all())
    assert int(q.abs().max()) == 127
    assert torch.equal(dequantize(q, scale), q.float() * scale.float()[..., None])


def test_zero_vectors_and_tiny_values() -> None:
    k = torch.zeros(3, 1, 8)
    v = torch.full((3, 1, 8), 1e-9)
    k2, v2 = get_codec("int8").decode(get_codec("int8").encode(k, v, 0, 1))
    assert torch.equal(k2, k)
    assert float((v2 - v).abs().max()) <= 2**-25  # half the smallest fp16 scale
