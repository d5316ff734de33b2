"""`cachegen`: CacheGen-style layer-dependent per-channel quantization plus ANS entropy coding.

After CacheGen (Liu et al., SIGCOMM'24, arXiv 2310.07240), adapted to what measurements on
SmolLM2 KV showed:

- Quantization is per channel (one (head, dim) pair) over the chunk's tokens: `bins` levels
  evenly spaced over the channel's [min, max]. Early layers get more bins than late ones:
  `bins_for_layer` falls geometrically (bits linearly) from the first layer's count to the
  last layer's, set separately for K and V. Error bound: step/2 per element, where
  step = range / (bins - 1) is the bin width.
- Locality: a channel is coded as token-to-token deltas of its integer levels when that is
  cheaper (lossless, so the error bound is unchanged). On SmolLM2 this pays for keys in the
  low-frequency RoPE channels; CacheGen's deltas against every 10th "anchor" token cost more
  bits than plain levels there (token-to-token correlation is weak), so anchors are not used.
- Entropy coding: one categorical model per (layer, K/V, channel), fit to that channel's symbol
  histogram, stored compactly as one 4-bit log-scale code per symbol of the channel's occupied
  range, and used by constriction's ANS coder. The coder's probabilities come only from these
  integer codes, so encoder and decoder build bit-identical models on any machine (a float
  parametric model would depend on each platform's erf/exp rounding).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from kvfuse.codecs import header
from kvfuse.codecs.base import Codec
from kvfuse.codecs.entropy import decode_channels, encode_channels, histogram_codes
from kvfuse.codecs.header import MAX_EXPANSION, BodyReader, CodecId, Header
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

MAX_BINS = 128  # so levels fit 7 bits and deltas fit int8 / their range fits uint8
# (first layer, last layer). On SmolLM2 fact-QA prompts (full KV reuse, 6 questions), 32->24
# for both gave a next-token KL of 0.006 nats to the exact KV at 3.68x smaller than fp16; 32->16
# (3.99x) gave 0.011, as much as int4 (3.2x); V errors cost more than K errors at 16 bins.
DEFAULT_KEY_BINS = (32, 24)
DEFAULT_VALUE_BINS = (32, 24)
IntArray = npt.NDArray[np.int64]


def bins_for_layer(layer_idx: int, num_layers: int, first_bins: int, last_bins: int) -> int:
    """Quantization levels per channel for one layer: geometric from first_bins to last_bins."""
    if num_layers <= 1:
        return first_bins
    frac = layer_idx / (num_layers - 1)
    return round(first_bins * (last_bins / first_bins) ** frac)


class CacheGenCodec(Codec):
    """See the module docstring. Thread-safe: no state beyond the two bin counts.

    Body per tensor (K then V): bins u8, lo fp16 [C], step fp16 [C], delta flags (packed bits,
    [ceil(C/8)]), then the entropy-coded channels (see `entropy.encode_channels`); finally
    u32 padding length and zero bytes (only for near-constant input, see header.MAX_EXPANSION).
    C = H_kv * D channels.
    """

    name = "cachegen"
    codec_id = CodecId.CACHEGEN

    def __init__(
        self,
        key_bins: tuple[int, int] = DEFAULT_KEY_BINS,
        value_bins: tuple[int, int] = DEFAULT_VALUE_BINS,
    ) -> None:
        """Args: key_bins, value_bins: (first layer, last layer) levels per channel of K, V."""
        for bins in (*key_bins, *value_bins):
            if not 2 <= bins <= MAX_BINS:
                raise CodecError(f"cachegen bins must be in [2, {MAX_BINS}], got {bins}")
        self.key_bins, self.value_bins = tuple(key_bins), tuple(value_bins)

    def bins(self, layer_idx: int, num_layers: int) -> tuple[int, int]:
        """Levels per channel of (K, V) this codec uses for `layer_idx` of `num_layers`."""
        return (
            bins_for_layer(layer_idx, num_layers, *self.key_bins),
            bins_for_layer(layer_idx, num_layers, *self.value_bins),
        )

    def encode(self, k: Tensor, v: Tensor, layer_idx: int, num_layers: int) -> bytes:
        k, v = check_kv(k, v, layer_idx, num_layers)
        check_finite(k, v)
        key_bins, value_bins = self.bins(layer_idx, num_layers)
        num_tokens = k.shape[0]
        body = _encode_tensor(k.reshape(num_tokens, -1), key_bins)
        body += _encode_tensor(v.reshape(num_tokens, -1), value_bins)
        min_size = math.ceil(2 * k.numel() / MAX_EXPANSION)
        pad = max(0, min_size - header.HEADER_SIZE - sum(map(len, body)) - 4)
        body += [np.uint32(pad).tobytes(), bytes(pad)]
        return header.pack(Header(self.codec_id, k.dtype, *k.shape), body)

    def decode(self, payload: bytes | memoryview) -> tuple[Tensor, Tensor]:
        head = header.parse(payload, self.codec_id)
        reader = BodyReader(payload)
        k = _decode_tensor(reader, head.num_tokens, head.num_heads * head.head_dim)
        v = _decode_tensor(reader, head.num_tokens, head.num_heads * head.head_dim)
        pad = reader.array(np.uint8, reader.scalar(np.uint32))
        if pad.any():
            raise CodecError("cachegen padding is not zero")
        reader.finish()
        return k.reshape(head.shape).to(head.dtype), v.reshape(head.shape).to(head.dtype)


def quantize(x: Tensor, bins: int) -> tuple[IntArray, Tensor, Tensor]:
    """Per-channel asymmetric quantization over tokens.

    Shape: x [T, C] -> (levels int64 [T, C] in 0..bins-1, lo fp16 [C], step fp16 [C]).
    `lo` is rounded down and `step` up to fp16, so levels never clip: |error| <= step / 2.
    """
    x = x.float()
    lo = fp16_floor(x.amin(dim=0))
    step = fp16_ceil((x.amax(dim=0) - lo.float()) / (bins - 1))
    check_fp16_range(lo, step)
    levels = torch.round((x - lo.float()) / step.float()).clamp_(0, bins - 1)
    return levels.to(torch.int64).numpy(), lo, step


def dequantize(levels: IntArray, lo: Tensor, step: Tensor) -> Tensor:
    """Inverse of `quantize` in float32. Shape: levels [T, C] -> [T, C]."""
    return lo.float() + torch.from_numpy(levels).float() * step.float()


def to_deltas(levels: IntArray) -> IntArray:
    """Token-to-token differences; the first token keeps its level. Shape: [T, C] -> [T, C]."""
    return np.diff(levels, axis=0, prepend=np.zeros((1, levels.shape[1]), np.int64))


def _encode_tensor(x: Tensor, bins: int) -> list[bytes]:
    """Body section of one tensor. Shape: x [T, C]."""
    levels, lo, step = quantize(x, bins)
    deltas = to_deltas(levels)
    plain_cost = histogram_codes(levels).num_bits
    delta_cost = histogram_codes(deltas).num_bits
    is_delta = delta_cost < plain_cost  # [C]
    symbols = np.where(is_delta[None, :], deltas, levels)  # [T, C]
    return [
        np.uint8(bins).tobytes(),
        to_bytes(lo),
        to_bytes(step),
        np.packbits(is_delta, bitorder="little").tobytes(),
        *encode_channels(symbols),
    ]


def _decode_tensor(reader: BodyReader, num_tokens: int, num_channels: int) -> Tensor:
    """Reads one tensor's section. Shape: -> [T, C] float32."""
    bins = reader.scalar(np.uint8)
    if not 2 <= bins <= MAX_BINS:
        raise CodecError(f"cachegen bins {bins} outside [2, {MAX_BINS}]")
    f16 = numpy_dtype(torch.float16)
    lo = from_array(reader.array(f16, num_channels), torch.float16, (num_channels,))
    step = from_array(reader.array(f16, num_channels), torch.float16, (num_channels,))
    if not (bool(torch.isfinite(lo).all()) and bool((step > 0).all() & torch.isfinite(step).all())):
        raise CodecError("cachegen lo/step must be finite and steps positive")
    flags = reader.array(np.uint8, -(-num_channels // 8))
    is_delta = np.unpackbits(flags, count=num_channels, bitorder="little").astype(bool)
    symbols = decode_channels(reader, num_tokens, num_channels, -(bins - 1), bins - 1)
    levels = np.where(is_delta[None, :], np.cumsum(symbols, axis=0), symbols)
    if levels.min() < 0 or levels.max() > bins - 1:
        raise CodecError(f"cachegen levels outside [0, {bins - 1}]")
    return dequantize(levels, lo, step)
