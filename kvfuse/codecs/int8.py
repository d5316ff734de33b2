"""`int8`: symmetric 8-bit quantization with one fp16 scale per (token, head) vector of D values."""

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
    from_array,
    numpy_dtype,
    to_bytes,
)
from kvfuse.errors import CodecError

QMAX = 127


class Int8Codec(Codec):
    """Per-(token, head) symmetric int8: q = round(x / s), s = max|x| / 127 over the D values.

    The scale is rounded *up* to fp16, so |q| <= 127 without clipping and every element's
    error is at most s/2 (plus the output dtype's own rounding). Inputs must be finite.
    Body: q_K int8 [T, H, D], q_V int8 [T, H, D], s_K fp16 [T, H], s_V fp16 [T, H];
    8.25 bits per element at D=64 (1.94x smaller than fp16).
    """

    name = "int8"
    codec_id = CodecId.INT8

    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        k, v = check_kv(k, v, layer_idx, num_layers)
        check_finite(k, v)
        (qk, sk), (qv, sv) = quantize(k), quantize(v)
        head = Header(self.codec_id, k.dtype, *k.shape)
        return header.pack(head, [to_bytes(qk), to_bytes(qv), to_bytes(sk), to_bytes(sv)])

    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        num_tokens, num_heads, _ = head.shape
        num_scales = num_tokens * num_heads
        reader = BodyReader(payload)
        expected = 2 * (head.num_elements + 2 * num_scales)
        if reader.num_bytes_left != expected:
            raise CodecError(f"body has {reader.num_bytes_left} bytes, header implies {expected}")
        qk = torch.from_numpy(reader.array(np.int8, head.num_elements)).reshape(head.shape)
        qv = torch.from_numpy(reader.array(np.int8, head.num_elements)).reshape(head.shape)
        sk = from_array(
            reader.array(numpy_dtype(torch.float16), num_scales),
            torch.float16,
            (num_tokens, num_heads),
        )
        sv = from_array(
            reader.array(numpy_dtype(torch.float16), num_scales),
            torch.float16,
            (num_tokens, num_heads),
        )
        return dequantize(qk, sk).to(head.dtype), dequantize(qv, sv).to(head.dtype)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-vector symmetric int8.

    Shape: x [T, H, D] -> (q int8 [T, H, D], scale fp16 [T, H]).

    Raises:
        CodecError: a scale overflows fp16 (|x| beyond ~8.3e6).
    """
    x = x.float()
    scale = fp16_ceil(x.abs().amax(dim=-1) / QMAX)  # [T, H]
    check_fp16_range(scale)
    q = torch.round(x / scale.float()[..., None]).clamp_(-QMAX, QMAX)
    return q.to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of `quantize` in float32. Shape: q [T, H, D], scale [T, H] -> [T, H, D]."""
    return q.float() * scale.float()[..., None]
