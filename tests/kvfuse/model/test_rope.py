"""RoPE: frequencies match transformers, and delta rotation moves post-RoPE keys exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

from kvfuse.model import fused, rope
from kvfuse.model.config import RopeConfig

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 100000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": LLAMA3,
}
SMOLLM_ROPE = RopeConfig(theta=100000.0)
LLAMA3_ROPE = RopeConfig.from_hf({"rope_parameters": LLAMA3})


def hf_inv_freq(rope_parameters: dict[str, Any], head_dim: int) -> Tensor:
    """transformers' own `inv_freq` for a Llama config with these RoPE parameters."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=8 * head_dim,
        num_attention_heads=8,
        head_dim=head_dim,
        rope_parameters=dict(rope_parameters),
    )
    kind = rope_parameters["rope_type"]
    if kind == "default":
        freqs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        freqs, _ = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return freqs


def random_keys(num_tokens: int, head_dim: int, seed: int) -> Tensor:
    """Shape: [T, H=2, D] fp32."""
    return torch.randn(num_tokens, 2, head_dim, generator=torch.Generator().manual_seed(seed))


def rope_at(k: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """The model's RoPE (`fused.rope_heads`) on [T, H, D] keys."""
    cos, sin = rope.cos_sin(positions, freqs)
    return fused.rope_heads(k.flatten(1), cos, sin, k.shape[1]).transpose(0, 1)


def rope_fp64(k: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """Reference RoPE with angles in float64. Shape: [T, H, D] -> same, float64."""
    angles = positions.double()[:, None] * freqs.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]
    k64 = k.double()
    return k64 * emb.cos() + rope.rotate_half(k64) * emb.sin()


def positions_and_deltas(num_tokens: int, max_position: int, seed: int) -> tuple[Tensor, Tensor]:
    """Old positions p and deltas Δ with 0 ≤ p, p + Δ < max_position."""
    gen = torch.Generator().manual_seed(seed)
    old = torch.randint(0, max_position, (num_tokens,), generator=gen)
    new = torch.randint(0, max_position, (num_tokens,), generator=gen)
    return old, new - old


@pytest.mark.parametrize("kind", ["default", "linear", "llama3"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_inv_freq_matches_transformers(kind: str, head_dim: int) -> None:
    params = ROPE_PARAMETERS[kind]
    ours = rope.inv_freq(RopeConfig.from_hf({"rope_parameters": params}), head_dim)
    expected = hf_inv_freq(params, head_dim)
    assert ours.dtype == torch.float32
    assert ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0.0)


def test_llama3_scaling_covers_all_three_bands() -> None:
    # With D=128 and θ=5e5 some pairs are untouched, some divided by 8 and some blended,
    # so the comparison above exercises every branch of the Llama-3 rule.
    plain = rope.inv_freq(RopeConfig(theta=500000.0), 128)
    ratio = plain / rope.inv_freq(LLAMA3_ROPE, 128)
    assert bool((ratio == 1.0).any())
    assert bool(torch.isclose(ratio, torch.tensor(8.0)).any())
    assert bool(((ratio > 1.001) & (ratio < 7.999)).any())


@pytest.mark.parametrize("cfg", [SMOLLM_ROPE, LLAMA3_ROPE], ids=["default", "llama3"])
def test_rotate_delta_round_trips(cfg: RopeConfig) -> None:
    freqs = rope.inv_freq(cfg, 64)
    k = random_keys(256, 64, seed=0)
    _, delta = positions_and_deltas(256, 8000, seed=1)
    back = rope.rotate_delta(rope.rotate_delta(k, delta, freqs), -delta, freqs)
    assert float((back - k).abs().max()) <= 1e-5


@pytest.mark.parametrize("cfg", [SMOLLM_ROPE, LLAMA3_ROPE], ids=["default", "llama3"])
def test_rotate_delta_equals_rope_at_new_position_short(cfg: RopeConfig) -> None:
    # Positions < 64: fp32 angles are exact to ~64·2⁻²⁴ rad, so the paths agree to 1e-5.
    freqs = rope.inv_freq(cfg, 64)
    k = random_keys(256, 64, seed=2)
    old, delta = positions_and_deltas(256, 64, seed=3)
    moved = rope.rotate_delta(rope_at(k, old, freqs), delta, freqs)
    assert float((moved - rope_at(k, old + delta, freqs)).abs().max()) <= 1e-5


@pytest.mark.parametrize("cfg", [SMOLLM_ROPE, LLAMA3_ROPE], ids=["default", "llama3"])
def test_rotate_delta_is_as_exact_as_rope_up_to_8000(cfg: RopeConfig) -> None:
    """At p ≈ 8000 an fp32 angle p·ω is only good to ~8000·2⁻²⁴ ≈ 5e-4 rad, in transformers and
    here alike, so 1e-5 agreement is out of reach; the delta path must be no less exact than
    rotating the raw key straight to the new position in fp32."""
    freqs = rope.inv_freq(cfg, 64)
    k = random_keys(512, 64, seed=4)
    old, delta = positions_and_deltas(512, 8000, seed=5)
    truth = rope_fp64(k, old + delta, freqs)
    moved = rope.rotate_delta(rope_at(k, old, freqs), delta, freqs)
    direct_err = float((rope_at(k, old + delta, freqs).double() - truth).abs().max())
    moved_err = float((moved.double() - truth).abs().max())
    assert direct_err <= 2e-3
    assert moved_err <= 2 * direct_err + 1e-5


def test_rope_at_zero_is_identity() -> None:
    freqs = rope.inv_freq(SMOLLM_ROPE, 64)
    k = random_keys(4, 64, seed=6)
    assert torch.equal(rope_at(k, torch.zeros(4, dtype=torch.long), freqs), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_delta_is_identity_bit_for_bit(dtype: torch.dtype) -> None:
    freqs = rope.inv_freq(LLAMA3_ROPE, 64)
    k = random_keys(32, 64, seed=7).to(dtype)
    out = rope.rotate_delta(k, torch.zeros(32, dtype=torch.long), freqs)
    assert out.dtype == dtype
    assert torch.equal(out, k)


def test_rotate_delta_keeps_dtype_and_computes_in_fp32() -> None:
    freqs = rope.inv_freq(SMOLLM_ROPE, 64)
    k = random_keys(64, 64, seed=8)
    _, delta = positions_and_deltas(64, 4000, seed=9)
    bf16 = rope.rotate_delta(k.bfloat16(), delta, freqs)
    assert bf16.dtype == torch.bfloat16
    # Computed in fp32 and rounded once at the end: each element within half a bf16 ulp
    # (≤ 2⁻⁸ relative) of the fp32 result on the same input.
    fp32 = rope.rotate_delta(k.bfloat16().float(), delta, freqs)
    assert bool(((bf16.float() - fp32).abs() <= 2**-8 * fp32.abs() + 1e-30).all())


def test_rotate_delta_preserves_pair_norms() -> None:
    freqs = rope.inv_freq(LLAMA3_ROPE, 64)
    k = random_keys(128, 64, seed=10)
    _, delta = positions_and_deltas(128, 8000, seed=11)
    moved = rope.rotate_delta(k, delta, freqs)

    def pair_norms(x: Tensor) -> Tensor:
        return x[..., :32].pow(2) + x[..., 32:].pow(2)

    torch.testing.assert_close(pair_norms(moved), pair_norms(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_delta_is_the_rotate_half_formula_bit_for_bit(dtype: torch.dtype) -> None:
    """The split-halves rotation skips `rotate_half`'s copy but must round exactly alike."""
    freqs = rope.inv_freq(LLAMA3_ROPE, 64)
    k = random_keys(96, 64, seed=12).to(dtype)
    _, delta = positions_and_deltas(96, 8000, seed=13)
    cos, sin = rope.cos_sin(delta, freqs)  # [T, D]
    k32 = k.float()
    expected = (k32 * cos[:, None] + rope.rotate_half(k32) * sin[:, None]).to(dtype)
    assert torch.equal(rope.rotate_delta(k, delta, freqs), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_heads_is_the_rotate_half_formula_bit_for_bit(dtype: torch.dtype) -> None:
    """`rope_heads` moves rotate_half's sign onto sin but must round exactly alike (the
    fused kernel is held to `rope_heads` in test_fused.py)."""
    freqs = rope.inv_freq(SMOLLM_ROPE, 64)
    rows = random_keys(96, 64, seed=15).to(dtype)  # [T, H, D]
    cos, sin = rope.cos_sin(torch.arange(96), freqs)  # [T, D]
    cos, sin = cos.to(dtype), sin.to(dtype)
    x = rows.transpose(0, 1)  # [H, T, D]
    expected = x * cos + rope.rotate_half(x) * sin
    assert torch.equal(fused.rope_heads(rows.flatten(1), cos, sin, 2), expected)


def test_one_delta_for_all_tokens_uses_one_table_row() -> None:
    freqs = rope.inv_freq(SMOLLM_ROPE, 64)
    k = random_keys(40, 64, seed=14)
    same = torch.full((40,), 517)
    cos, _ = rope.delta_tables(same, freqs)
    assert cos.shape == (1, 1, 32)
    per_token = rope.rotate_delta(k, same + torch.zeros(40, dtype=torch.long), freqs)
    varied = torch.cat([same[:-1], torch.tensor([3])])
    assert rope.delta_tables(varied, freqs)[0].shape == (40, 1, 32)
    assert torch.equal(per_token[:-1], rope.rotate_delta(k, varied, freqs)[:-1])
