"""Rotary position embeddings: frequencies (default, linear, Llama-3), rotation and delta rotation.

RoPE rotates each (x_i, x_{i+D/2}) pair by angle p·ω_i, so R(p_new) = R(p_new − p_old)·R(p_old):
a key stored post-RoPE at p_old moves to p_new by rotating it by the delta alone, with the
model's own `inv_freq`, which keeps linear and Llama-3 scaling exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvfuse.model.config import RopeConfig


def inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Per-pair angular frequencies ω, fp32. Shape: [D/2]."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    freqs = 1.0 / (rope.theta**exponents)
    if rope.scaling_type == "linear":
        return freqs / rope.factor
    if rope.scaling_type == "llama3":
        return _llama3_scale(freqs, rope)
    return freqs


def _llama3_scale(freqs: Tensor, rope: RopeConfig) -> Tensor:
    """Llama-3 scaling: slow long-wavelength pairs by `factor`, blend the middle band."""
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / freqs
    scaled = torch.where(wavelen > low_freq_wavelen, freqs / rope.factor, freqs)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def cos_sin(positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation tables for integer positions, fp32. Shape: [T] -> ([T, D], [T, D])."""
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]  # [T, D/2]
    emb = torch.cat((angles, angles), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(a, b) -> (−b, a) on the two halves of the last dimension: RoPE's definition, which
    the model's kernels (`kvfuse.model.fused.rope_heads`) and `rotate_into` reproduce."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def delta_tables(delta_positions: Tensor, freqs: Tensor) -> tuple[Tensor, Tensor]:
    """Half-width cos/sin tables of per-token position deltas, fp32, for `rotate_into`.

    The two halves of a `cos_sin` row are equal, so half a row is enough. A chunk moved as a
    whole has one delta for all its tokens; its table is then a single row that broadcasts.
    Shape: [T] -> ([T', 1, D/2], [T', 1, D/2]) with T' = 1 when all deltas are equal.
    """
    same = delta_positions.numel() > 0 and bool((delta_positions == delta_positions[0]).all())
    cos, sin = cos_sin(delta_positions[:1] if same else delta_positions, freqs)  # [T', D]
    half = cos.shape[-1] // 2
    return cos[:, None, :half], sin[:, None, :half]


def rotate_into(k: Tensor, cos: Tensor, sin: Tensor, out: Tensor) -> None:
    """Writes `k` rotated by `delta_tables` angles into `out` (any dtype and strides).

    Computed in fp32 and bit for bit what `k32 * cos + rotate_half(k32) * sin` gives (a
    negated product is exact), without building `rotate_half`'s copy.
    Shape: k [T, H, D], cos/sin [T | 1, 1, D/2], out [T, H, D].
    """
    half = k.shape[-1] // 2
    k32 = k.to(torch.float32)
    first, second = k32[..., :half], k32[..., half:]  # [T, H, D/2] each
    out[..., :half] = first * cos - second * sin
    out[..., half:] = second * cos + first * sin


def rotate_delta(k: Tensor, delta_positions: Tensor, freqs: Tensor) -> Tensor:
    """Moves post-RoPE keys by per-token position deltas (computed in fp32).

    Shape: k [T, H, D], delta_positions [T] -> [T, H, D] in k's dtype.
    """
    out = torch.empty_like(k)
    rotate_into(k, *delta_tables(delta_positions, freqs), out)
    return out
