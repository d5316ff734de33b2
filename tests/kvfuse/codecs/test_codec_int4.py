"""`int4`: every element within step/2 of its group of 32, two values per byte, 5 bits/value."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

from kvfuse.codecs import get_codec
from kvfuse.codecs.header import HEADER_SIZE
from kvfuse.codecs.int4 import GROUP_SIZE, pack_nibbles, quantize, unpack_nibbles

if TYPE_CHECKING:  # conftest is pytest's to import; only its type is needed here
    from tests.kvfuse.codecs.conftest import KVFactory

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_within_half_step(x: torch.Tensor, out: torch.Tensor) -> None:
    """|out - x| <= step/2 of x's group (+ the output dtype's rounding)."""
    _, _lo, step = quantize(x)
    per_element = step.float().repeat_interleave(GROUP_SIZE, dim=-1)[..., : x.shape[-1]]
    bound = per_element / 2 + out.float().abs() * torch.finfo(x.dtype).eps / 2
    assert bool(((out.float() - x.float()).abs() <= bound * (1 + 1e-5) + 1e-30).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 40, 1])
def test_error_is_at_most_half_a_step(
    dtype: torch.dtype, head_dim: int, make_random: KVFactory, make_structured: KVFactory
) -> None:
    codec = get_codec("int4")
    for k, v in (
        make_random(head_dim=head_dim, dtype=dtype),
        make_random(seed=1, head_dim=head_dim),
    ):
        k, v = k.to(dtype), v.to(dtype)
        k2, v2 = codec.decode(codec.encode(k, v, 0, 1))
        assert_within_half_step(k, k2)
        assert_within_half_step(v, v2)
    k, v = make_structured(dtype=dtype)
    k2, v2 = codec.decode(codec.encode(k, v, 0, 1))
    assert_within_half_step(k, k2)
    assert_within_half_step(v, v2)


def test_size_is_five_bits_per_value_at_d64(make_random: KVFactory) -> None:
    k, v = make_random(num_tokens=10, num_heads=3, head_dim=64)
    payload = get_codec("int4").encode(k, v, 0, 1)
    assert len(payload) == HEADER_SIZE + 2 * k.numel() * 5 // 8


def test_step_is_tight_and_levels_span_the_group(make_random: KVFactory) -> None:
    k, _ = make_random()
    q, lo, step = quantize(k)
    groups = k.reshape(*q.shape)
    assert bool((lo.float() <= groups.amin(-1)).all())
    assert bool((lo.float() + 15 * step.float() >= groups.amax(-1)).all())
    span = groups.amax(-1) - groups.amin(-1)
    assert bool((15 * step.float() <= span * (1 + 2**-9) + 1e-3).all())
    assert int(q.max()) == 15 and int(q.min()) == 0


def test_nibble_packing_round_trips() -> None:
    q = torch.randint(0, 16, (2, 3, 1, GROUP_SIZE), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (2, 3, 1, GROUP_SIZE // 2)
    assert int(packed[0, 0, 0, 0]) == int(q[0, 0, 0, 0]) | int(q[0, 0, 0, 1]) << 4
    assert torch.equal(unpack_nibbles(packed.flatten(), (2, 3, 1)), q)
