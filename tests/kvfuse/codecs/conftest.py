"""Factories for codec tests: random and structured K/V of a given shape and dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

KVFactory = Callable[..., tuple[Tensor, Tensor]]


def random_kv(
    num_tokens: int = 37,
    num_heads: int = 3,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Gaussian K/V with per-channel scales and offsets and a few large outliers.

    Shape: ([T, H, D], [T, H, D]).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = (num_tokens, num_heads, head_dim)
    scale = torch.rand(num_heads, head_dim, generator=gen) * 3 + 0.1
    offset = torch.randn(num_heads, head_dim, generator=gen)
    k = torch.randn(shape, generator=gen) * scale + offset
    v = torch.randn(shape, generator=gen) * 0.5
    k.view(-1)[:: max(1, k.numel() // 5)] *= 8  # outliers
    return k.to(dtype), v.to(dtype)


def structured_kv(
    num_tokens: int = 64, num_heads: int = 2, head_dim: int = 32, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """K like post-RoPE keys (rotating pairs), V slowly drifting, plus a constant channel and a
    token of zeros. Shape: ([T, H, D], [T, H, D])."""
    pos = torch.arange(num_tokens, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
    freq = 1e4 ** (-torch.arange(head_dim // 2, dtype=torch.float32) / (head_dim // 2))
    angle = pos * freq  # [T, 1, D/2]
    amp = torch.linspace(0.5, 4.0, num_heads)[None, :, None]
    k = torch.cat([amp * torch.cos(angle), amp * torch.sin(angle)], dim=-1)  # [T, H, D]
    v = torch.sin(pos / 7 + torch.arange(head_dim) / 3) * amp + 0.1 * math.pi
    v = v.expand(num_tokens, num_heads, head_dim).clone()
    k[:, 0, 1] = 2.5  # constant channel
    v[num_tokens // 2] = 0  # an all-zero token
    return k.to(dtype), v.to(dtype)


@pytest.fixture
def make_random() -> KVFactory:
    return random_kv


@pytest.fixture
def make_structured() -> KVFactory:
    return structured_kv
