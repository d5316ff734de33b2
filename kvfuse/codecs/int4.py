"""`int4`: asymmetric 4-bit quantization in groups of 32 values along D, two values per byte."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kvfuse.codecs import header
from kvfuse.codecs.base import Codec
from kvfuse.codecs.header import BodyReader, CodecId, Header
from kvfuse.codecs.tensors import (
    check_finite,
    check_fp16_range,
    check_kv,
    fp16_ceil,
    fp16_floor,
    from_array,
    numpy_dtype,
    to_bytes,
)
from kvfuse.errors import CodecError

GROUP_SIZE = 32
LEVELS = 16


def num_groups(head_dim: int) -> int:
    """Groups per (token, head) vector: D padded up to a multiple of GROUP_SIZE."""
    return -(-head_dim // GROUP_SIZE)


class Int4Codec(Codec):
    """Group-wise asymmetric int4: x ~ lo + q * step, q in 0..15, one (lo, step) per group.

    Groups are 32 consecutive values along D (a D that is not a multiple of 32 is padded by
    repeating its last value, which widens no group). `lo` is rounded down and `step` up to
    fp16, so q never clips and every element's error is at most step/2 (plus the output
    dtype's own rounding). Inputs must be finite.
    Body: packed q_K uint8 [T, H, G, 16], packed q_V, lo_K fp16 [T, H, G], step_K, lo_V,
    step_V (low nibble = even index). 5 bits per element at D=64 (3.2x smaller than fp16).
    """

    name = "int4"
    codec_id = CodecId.INT4

    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        k, v = check_kv(k, v, layer_idx, num_layers)
        check_finite(k, v)
        (qk, lo_k, step_k), (qv, lo_v, step_v) = quantize(k), quantize(v)
        head = Header(self.codec_id, k.dtype, *k.shape)
        parts = [pack_nibbles(qk), pack_nibbles(qv), lo_k, step_k, lo_v, step_v]
        return header.pack(head, [to_bytes(p) for p in parts])

    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        num_tokens, num_heads, head_dim = head.shape
        group_shape = (num_tokens, num_heads, num_groups(head_dim))
        num_params = group_shape[0] * group_shape[1] * group_shape[2]
        num_packed = num_params * GROUP_SIZE // 2
        reader = BodyReader(payload)
        expected = 2 * num_packed + 4 * 2 * num_params
        if reader.num_bytes_left != expected:
            raise CodecError(f"body has {reader.num_bytes_left} bytes, header implies {expected}")
        packed = [torch.from_numpy(reader.array(np.uint8, num_packed)) for _ in range(2)]
        f16 = numpy_dtype(torch.float16)
        params = [
            from_array(reader.array(f16, num_params), torch.float16, group_shape) for _ in range(4)
        ]
        k = dequantize(unpack_nibbles(packed[0], group_shape), params[0], params[1], head_dim)
        v = dequantize(unpack_nibbles(packed[1], group_shape), params[2], params[3], head_dim)
        return k.to(head.dtype), v.to(head.dtype)


def quantize(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric 4-bit quantization.

    Shape: x [T, H, D] -> (q uint8 [T, H, G, 32] in 0..15, lo fp16 [T, H, G], step fp16 [T, H, G]).

    Raises:
        CodecError: a group's lo or step overflows fp16.
    """
    num_tokens, num_heads, head_dim = x.shape
    padded = num_groups(head_dim) * GROUP_SIZE
    x = x.float()
    if padded != head_dim:
        x = torch.cat([x, x[..., -1:].expand(-1, -1, padded - head_dim)], dim=-1)
    groups = x.reshape(num_tokens, num_heads, -1, GROUP_SIZE)  # [T, H, G, 32]
    lo = fp16_floor(groups.amin(dim=-1))
    step = fp16_ceil((groups.amax(dim=-1) - lo.float()) / (LEVELS - 1))
    check_fp16_range(lo, step)
    q = torch.round((groups - lo.float()[..., None]) / step.float()[..., None])
    return q.clamp_(0, LEVELS - 1).to(torch.uint8), lo, step


def dequantize(q: Tensor, lo: Tensor, step: Tensor, head_dim: int) -> Tensor:
    """Inverse of `quantize` in float32. Shape: q [T, H, G, 32] -> [T, H, D] (padding cropped)."""
    x = lo.float()[..., None] + q.float() * step.float()[..., None]
    return x.flatten(-2)[..., :head_dim].contiguous()


def pack_nibbles(q: Tensor) -> Tensor:
    """Two 4-bit values per byte, even index in the low nibble. Shape: [..., 2n] -> [..., n]."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor, group_shape: tuple[int, int, int]) -> Tensor:
    """Inverse of `pack_nibbles`. Shape: flat uint8 [T*H*G*16] -> uint8 [T, H, G, 32]."""
    packed = packed.reshape(*group_shape, GROUP_SIZE // 2)
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)
